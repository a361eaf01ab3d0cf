"""`sparsemoe-vlm evaluate`, explicit validation / test files, split reporting, the epoch / step defaults and the
prompt order of training and evaluation."""

import json

import PIL.Image
import pytest
from huggingface_hub import ModelCard

from hf_sparsemoe_vlm.app.cli import main, parse_train_args
from hf_sparsemoe_vlm.app.training import VLMDataCollator

from tiny_models import fake_run, make_processor_and_model, to_old_layout


TINY_RUN = ["--preset", "tiny", "--num_train_examples", "48", "--num_validation_examples", "4",
            "--num_test_examples", "10", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
            "--max_new_tokens", "4", "--vision_pretraining_steps", "0", "--save_strategy", "no", "--use_cpu", "true",
            "--question_types", "colour,count,caption"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("evaluate") / "run"
    assert main(["train", "--output_dir", str(output), "--max_steps", "3", *TINY_RUN]) == 0
    return output


def write_rows(folder, names, colours):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, colour in zip(names, colours, strict=True):
        PIL.Image.new("RGB", (16, 16), {"red": (255, 0, 0), "blue": (0, 0, 255)}[colour]).save(folder / name)
        rows.append({"image": name, "question": "What colour?", "answer": colour})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_main_job_defaults_follow_transformers_epochs_and_random_prompt_order():
    model_args, data_args, training_args = parse_train_args([])
    # Transformers' own default: no step count, the epochs count (32,000 examples / 32 per step x 5 = 5,000 steps).
    assert training_args.max_steps == -1 and training_args.num_train_epochs == 5
    assert data_args.question_types.split(",").count("position") == 2  # asked twice as often as each other type
    assert data_args.num_train_examples == 32000 and training_args.per_device_train_batch_size == 32
    assert data_args.prompt_order == "random" and data_args.image_after_question is None
    # An explicit step count still wins, as in Trainer.
    _, _, training_args = parse_train_args(["--max_steps", "7"])
    assert training_args.max_steps == 7


def test_nothing_to_train_points_to_evaluate(tmp_path):
    with pytest.raises(ValueError, match="Nothing to train.*sparsemoe-vlm evaluate MODEL_DIR"):
        main(["train", "--output_dir", str(tmp_path / "o"), "--max_steps", "0", "--num_train_epochs", "0"])
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_epochs_count_when_no_step_count_is_given(tmp_path):
    output = tmp_path / "run"
    main(["train", "--output_dir", str(output), "--num_train_epochs", "2", *TINY_RUN])
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    # 48 examples / 8 per step = 6 steps an epoch.
    assert history[-1]["step"] == 12 and history[-1]["epoch"] == 2.0
    assert json.loads((output / "training_args.json").read_text())["max_steps"] == -1
    assert "| epochs | 2 |" in (output / "README.md").read_text()


def test_random_prompt_order_is_per_example_and_reproducible():
    processor, _ = make_processor_and_model()
    rows = [{"image": PIL.Image.new("RGB", (20, 20)), "question": "What colour?", "answer": "red"}] * 24

    def image_first_flags(seed):
        batch = VLMDataCollator(processor, prompt_order="random", seed=seed)(rows)
        question = processor.tokenizer("What colour?", add_special_tokens=False)["input_ids"][0]
        flags = []
        for ids in batch["input_ids"].tolist():
            flags.append(ids.index(processor.image_token_id) < ids.index(question))
        return flags

    flags = image_first_flags(0)
    assert 6 <= sum(flags) <= 18  # both orders, about half each
    assert image_first_flags(0) == flags and image_first_flags(1) != flags
    with pytest.raises(ValueError, match="Unknown prompt order 'sideways'"):
        VLMDataCollator(processor, prompt_order="sideways")


def test_assigned_prompt_orders_are_fixed_per_example_whatever_the_batch_order():
    from datasets import Dataset

    from hf_sparsemoe_vlm.app.training import assign_prompt_orders

    processor, _ = make_processor_and_model()
    rows = Dataset.from_dict({"image": [PIL.Image.new("RGB", (20, 20))] * 40, "question": ["What colour?"] * 40,
                              "answer": ["red"] * 40})
    flags = assign_prompt_orders(rows, seed=3)["image_first"]
    assert flags == assign_prompt_orders(rows, seed=3)["image_first"] != assign_prompt_orders(rows, seed=4)["image_first"]
    assert 10 <= sum(flags) <= 30
    ordered = assign_prompt_orders(rows, seed=3)
    collator = VLMDataCollator(processor, prompt_order="random")
    image_id = processor.image_token_id
    question = processor.tokenizer("What colour?", add_special_tokens=False)["input_ids"][0]
    # Rows in reverse order, in two batches: each still gets its own order.
    for start in (30, 0):
        picked = [ordered[i] for i in reversed(range(start, start + 10))]
        for row, ids in zip(picked, collator(picked)["input_ids"].tolist(), strict=True):
            assert (ids.index(image_id) < ids.index(question)) == row["image_first"]


def test_conversation_rows_keep_their_order_unless_asked():
    processor, _ = make_processor_and_model()
    row = {"image": PIL.Image.new("RGB", (20, 20)), "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    fixed = VLMDataCollator(processor, prompt_order="image_first")
    assert [item["type"] for item in fixed.conversation(row)[0]["content"]] == ["text", "image"]
    moved = fixed.conversation(row, image_first=True)[0]["content"]
    assert [item["type"] for item in moved] == ["image", "text"] and moved[1]["text"] == "Look:"


def test_deprecated_image_after_question_still_chooses_a_fixed_order():
    from hf_sparsemoe_vlm.app.cli import resolve_prompt_order

    _, data_args, _ = parse_train_args(["--image_after_question", "true"])
    assert resolve_prompt_order(data_args) == "question_first"
    _, data_args, _ = parse_train_args(["--image_after_question", "false"])
    assert resolve_prompt_order(data_args) == "image_first"
    _, data_args, _ = parse_train_args(["--prompt_order", "backwards"])
    with pytest.raises(ValueError, match="--prompt_order 'backwards': expected one of"):
        resolve_prompt_order(data_args)


@pytest.mark.slow
def test_train_scores_both_orders_and_evaluate_reproduces_the_figures(trained_run, capsys):
    metrics = json.loads((trained_run / "all_results.json").read_text())
    for key in ("test_exact_match", "test_exact_match_image_first", "test_exact_match_question_first",
                "test_exact_match_colour_image_first", "test_exact_match_count_question_first", "test_caption_bleu"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # Pooled figure = mean of the two orders (same questions in each).
    assert metrics["test_exact_match"] == pytest.approx(
        (metrics["test_exact_match_image_first"] + metrics["test_exact_match_question_first"]) / 2)
    assert metrics["test_source"].startswith("generated held-out examples (synthetic shapes, seed 0")
    capsys.readouterr()
    # The run's own data settings are the defaults: the same 10 test questions, the same figures.
    evaluated = main(["evaluate", str(trained_run)])
    assert evaluated == 0
    printed = capsys.readouterr().out
    assert "data: test 10 rows" in printed and "image_first:" in printed and "question_first:" in printed
    results = json.loads((trained_run / "eval_test_results.json").read_text())
    for key, value in metrics.items():
        if key.startswith("test_") and isinstance(value, float):
            assert results[key] == pytest.approx(value), key


@pytest.mark.slow
def test_evaluate_can_update_the_card_with_one_order(trained_run):
    before = json.loads((trained_run / "all_results.json").read_text())
    assert main(["evaluate", str(trained_run), "--prompt_orders", "image_first", "--update_card", "true",
                 "--metrics_file", str(trained_run / "image_first.json")]) == 0
    after = json.loads((trained_run / "all_results.json").read_text())
    assert after["test_exact_match"] == pytest.approx(before["test_exact_match_image_first"])
    assert "test_exact_match_question_first" not in after and after["test_prompt_orders"] == "image_first"
    assert after["validation_loss"] == before["validation_loss"]  # Trainer's figures stay
    card = ModelCard.load(trained_run / "README.md")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["exact_match"] == round(after["test_exact_match"], 4)
    # Restore the two-order figures for the other tests of this module.
    (trained_run / "all_results.json").write_text(json.dumps(before))


@pytest.mark.slow
def test_evaluate_takes_any_dataset_and_split(trained_run, tmp_path, capsys):
    rows = write_rows(tmp_path, [f"{i}.png" for i in range(6)], ["red", "blue"] * 3)
    data = write_jsonl(tmp_path / "colours.jsonl", rows)
    main(["evaluate", str(trained_run), "--dataset", str(data), "--split", "validation",
          "--metrics_file", str(tmp_path / "m.json")])
    printed = capsys.readouterr().out
    assert "data: validation 1 rows, 1 rows (5%) carved from the training rows of colours.jsonl" in printed
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) >= {"validation_exact_match", "validation_exact_match_image_first"}
    assert "validation_caption_bleu" not in metrics  # no captions in this data


def test_evaluate_errors_name_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="no config.json there"):
        main(["evaluate", str(tmp_path)])
    processor, model = make_processor_and_model()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match="--split 'dev': expected test, validation or train"):
        main(["evaluate", str(tmp_path / "m"), "--split", "dev"])
    with pytest.raises(SystemExit, match="--prompt_orders 'sideways'"):
        main(["evaluate", str(tmp_path / "m"), "--prompt_orders", "sideways"])
    with pytest.raises(SystemExit, match="split of synthetic is empty"):
        main(["evaluate", str(tmp_path / "m"), "--num_test_examples", "0"])
    assert not (tmp_path / "m" / "eval_test_results.json").exists()


def test_evaluate_reads_and_updates_an_old_layout_run_folder_as_a_new_one(tmp_path, capsys):
    processor, model = make_processor_and_model()
    results, cards = {}, {}
    for layout in ("new", "old"):
        folder = fake_run(tmp_path / layout)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        run_args = json.loads((folder / "run_args.json").read_text())
        run_args["data"].update(num_test_examples=3, question_types="colour,count", max_new_tokens=2)
        (folder / "run_args.json").write_text(json.dumps(run_args))
        if layout == "old":
            to_old_layout(folder)
        capsys.readouterr()
        assert main(["evaluate", str(folder), "--update_card", "true", "--model_id", "org/m"]) == 0
        assert "data: test 3 rows" in capsys.readouterr().out  # the run's own data settings, in either layout
        # The results are updated where the folder keeps them, never copied under the other name.
        kept, other = ("all_results.json", "metrics.json") if layout == "new" else ("metrics.json", "all_results.json")
        results[layout] = json.loads((folder / kept).read_text())
        assert not (folder / other).exists()
        cards[layout] = (folder / "README.md").read_text()
    assert results["new"] == results["old"]
    # The other figures stay (Trainer's validation loss, the wall time); the split's old generation scores go.
    assert results["old"]["validation_loss"] == 0.37 and results["old"]["train_minutes"] == 9.1
    assert not {"test_exact_match_shape", "test_caption_bleu"} & set(results["old"])
    assert cards["new"] == cards["old"] and f"| exact_match | test | {results['old']['test_exact_match']:.4f} |" in \
        cards["old"]


@pytest.mark.slow
def test_train_takes_explicit_validation_and_test_files_and_prints_the_splits(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", write_rows(tmp_path, [f"t{i}.png" for i in range(12)],
                                                             ["red", "blue"] * 6))
    dev = write_jsonl(tmp_path / "dev.jsonl", write_rows(tmp_path, ["d0.png", "d1.png"], ["red", "blue"]))
    test = write_jsonl(tmp_path / "test.jsonl", write_rows(tmp_path, ["s0.png", "s1.png", "s2.png"],
                                                           ["blue", "red", "blue"]))
    output = tmp_path / "run"
    main(["train", "--dataset", str(train), "--eval_dataset", str(dev), "--test_dataset", str(test),
          "--output_dir", str(output), "--max_steps", "2", "--preset", "tiny", "--per_device_train_batch_size", "4",
          "--max_new_tokens", "2", "--save_strategy", "no", "--use_cpu", "true"])
    printed = capsys.readouterr().out
    # Nothing carved from the training file: every one of its 12 rows trains.
    assert "data: train 12 rows, the `train` split of train.jsonl" in printed
    assert "data: validation 2 rows, dev.jsonl (given as the validation set)" in printed
    assert "data: test 3 rows, test.jsonl (given as the test set)" in printed
    metrics = json.loads((output / "all_results.json").read_text())
    assert metrics["test_source"] == "test.jsonl (given as the test set)"
    card = (output / "README.md").read_text()
    assert "the test figures come from test.jsonl (given as the test set)" in card
    assert "BLEU" not in card  # no captions
    # The local card's snippets load the folder by the path the run was given (push rewrites them to the repo id);
    # no other line names a local path.
    assert all(f'("{output}"' in line or f'"{output}",' in line for line in card.splitlines() if str(tmp_path) in line)

    # Without them the carving is said out loud, in the log and on the card.
    output = tmp_path / "carved"
    main(["train", "--dataset", str(train), "--output_dir", str(output), "--max_steps", "1", "--preset", "tiny",
          "--per_device_train_batch_size", "4", "--max_new_tokens", "2", "--save_strategy", "no", "--use_cpu", "true"])
    printed = capsys.readouterr().out
    assert "data: train 10 rows, the rest of train.jsonl's training rows" in printed
    assert "data: test 1 rows, 1 rows (5%) carved from the training rows of train.jsonl (shuffle seed 0); pass " \
           "--test_dataset to give a test set" in printed
    assert "carved from the training rows of train.jsonl" in (output / "README.md").read_text()


def test_given_split_files_are_checked_like_the_training_data(tmp_path):
    from hf_sparsemoe_vlm.app.data import load_vlm_splits

    train = write_jsonl(tmp_path / "train.jsonl", write_rows(tmp_path, ["a.png", "b.png", "c.png"],
                                                             ["red", "blue", "red"]))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "q?", "answer": "red"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl \(given as the test set\) \(test split\): missing column"):
        load_vlm_splits(str(train), test_source=str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="Dataset not found"):
        load_vlm_splits(str(train), validation_source=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="--eval_dataset / --test_dataset take data on disk"):
        main(["train", "--test_dataset", str(train), "--output_dir", str(tmp_path / "o")])
