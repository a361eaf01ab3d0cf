"""Issue #18, `sparsemoe-vlm train` / `push`: bad training rows are named (file, row or line) with the fix; what can
be checked is checked before step 1 (images, output folder, the checkpoint to resume, the model to fine-tune); a
fault in the middle of training saves what was trained; `--resume_from_checkpoint last` takes the newest complete
checkpoint of this run, with its tokenizer and routing counts; `push` gives up on a Hub that stops answering."""

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import PIL.Image
import pytest
import torch
from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, TrainerState

from hf_sparsemoe_vlm.app.checkpoints import (
    EXPERT_LOAD_FILE,
    checkpoint_problem,
    find_last_checkpoint,
    load_expert_load,
    read_run_id,
    write_run_file,
)
from hf_sparsemoe_vlm.app.cli import ModelArguments, _build_model_and_processor, main
from hf_sparsemoe_vlm.app.data import load_vlm_dataset

from tiny_models import fake_run, make_model, make_processor_and_model


def write_images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        PIL.Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / f"img{i}.png")
    return [f"images/img{i}.png" for i in range(n)]


def rows(paths, **fields):
    return [{"image": path, "question": "What colour?", "answer": "red", **fields} for path in paths]


# Refused by checks that run before a model is built: these `train` calls take no training time.
QUICK = ["--max_steps", "1", "--use_cpu", "true", "--vision_pretraining_steps", "0", "--save_strategy", "no"]


# -- 1. training rows ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ({"image": "images/img0.png", "question": "q", "answer": "a"}, "holds one JSON object, not a list of rows"),
    ({"data": [{"image": "images/img0.png"}]}, "The rows seem to be under `data`"),
    ([1, 2], r"row 0: a row must be a JSON object with named fields, got a JSON number"),
    ("rows", "holds a JSON string, not a list of rows"),
])
def test_a_json_file_that_is_not_a_list_of_objects_is_refused(tmp_path, content, message):
    write_images(tmp_path / "images")
    (tmp_path / "data.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_vlm_dataset(str(tmp_path / "data.json"))


def test_a_corrupt_jsonl_line_is_named_with_its_file_and_line(tmp_path):
    paths = write_images(tmp_path / "images")
    lines = [json.dumps(row) for row in rows(paths)]
    lines[2] = lines[2][:25]  # e.g. a line cut short by a crashed writer
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl, line 3: not a complete JSON object .*fix or remove that line"):
        load_vlm_dataset(str(tmp_path / "data.jsonl"))
    (tmp_path / "data.jsonl").write_text("\n".join(lines[:2] + ["[1, 2]"]) + "\n")
    with pytest.raises(ValueError, match="data.jsonl, line 3: a row must be a JSON object"):
        load_vlm_dataset(str(tmp_path / "data.jsonl"))
    # A last line cut short says so.
    (tmp_path / "data.jsonl").write_text("\n".join([*lines[:2], lines[3][:30]]))
    with pytest.raises(ValueError, match="line 3: .*the last line: was the file completely written"):
        load_vlm_dataset(str(tmp_path / "data.jsonl"))


def test_numeric_answers_become_text(tmp_path):
    paths = write_images(tmp_path / "images")
    records = [{"image": path, "question": "How many shapes?", "answer": answer}
               for path, answer in zip(paths, [3, "two", 1.5, 4], strict=True)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    dataset = load_vlm_dataset(str(tmp_path / "data.json"), validation_fraction=0, test_fraction=0)
    assert sorted(dataset["train"]["answer"]) == ["1.5", "3", "4", "two"]
    # A saved dataset whose answer column is numeric.
    images = [PIL.Image.new("RGB", (8, 8), "red")] * 3
    split = Dataset.from_dict({"image": images, "question": ["How many?"] * 3, "answer": [1, 2, 3]})
    DatasetDict({"train": split.cast_column("image", ImageFeature())}).save_to_disk(tmp_path / "saved")
    dataset = load_vlm_dataset(str(tmp_path / "saved"), validation_fraction=0, test_fraction=0)
    assert dataset["train"]["answer"] == ["1", "2", "3"]


def test_a_field_of_mixed_types_is_named(tmp_path):
    paths = write_images(tmp_path / "images")
    records = rows(paths)
    records[2]["id"], records[3]["id"] = "a", [1]
    (tmp_path / "data.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="Row 3 of .*field `id` is a list here but a string in row 2"):
        load_vlm_dataset(str(tmp_path / "data.json"))


def test_an_image_placeholder_inside_a_plain_question_is_refused(tmp_path):
    paths = write_images(tmp_path / "images")
    records = rows(paths)
    records[1]["question"] = "<image>\nWhat colour?"
    (tmp_path / "data.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"Row 1 of .*the `question` contains `<image>`.*Remove it from the text"):
        load_vlm_dataset(str(tmp_path / "data.json"))


def test_llava_rows_with_more_placeholders_than_images_are_refused(tmp_path):
    paths = write_images(tmp_path / "images")

    def conversation(path, first="<image>\nWhat colour?", answer="red"):
        return {"image": path, "conversations": [{"from": "human", "value": first}, {"from": "gpt", "value": answer},
                                                 {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]}

    records = [conversation(path) for path in paths]
    records[2]["conversations"][2]["value"] = "<image> and this one?"
    (tmp_path / "llava.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="Row 2 of .*2 `<image>` placeholders but a row has one image"):
        load_vlm_dataset(str(tmp_path / "llava.json"))
    records[2] = conversation(paths[2], first="<image><image> compare")
    (tmp_path / "llava.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="Row 2 of .*2 `<image>` placeholders"):
        load_vlm_dataset(str(tmp_path / "llava.json"))
    records[2] = conversation(paths[2], first="What colour?", answer="it is <image>")
    (tmp_path / "llava.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="Row 2 of .*`<image>` in a 'gpt' turn; the image belongs in a human turn"):
        load_vlm_dataset(str(tmp_path / "llava.json"))
    records[2] = {"image": paths[2], "conversations": ["not a turn"]}
    (tmp_path / "llava.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="Row 2 of .*each turn needs `from`"):
        load_vlm_dataset(str(tmp_path / "llava.json"))


def test_mixed_llava_and_plain_rows_are_refused(tmp_path):
    paths = write_images(tmp_path / "images")
    records = rows(paths[:2]) + [{"image": path, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]} for path in paths[2:]]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="Row 0 of .*a row without `conversations` in a file of LLaVA conversations "
                                         r"\(row 2 has them\); one file holds one kind of row"):
        load_vlm_dataset(str(tmp_path / "mixed.json"))


# -- 2, 3. checked before step 1: images, URLs offline, the output folder ---------------------------------------------

def test_an_unreadable_image_is_named_before_any_step(tmp_path):
    paths = write_images(tmp_path / "images", n=12)
    (tmp_path / "images" / "img7.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "data.json").write_text(json.dumps(rows(paths)))
    output = tmp_path / "run"
    with pytest.raises(ValueError, match=r"Row \d+ of the \w+ split .*img7.png' cannot be opened as an image"):
        main(["train", "--dataset", str(tmp_path / "data.json"), "--output_dir", str(output), *QUICK])
    assert not list(output.glob("checkpoint-*")) and not (output / "model.safetensors").exists()
    (tmp_path / "images" / "img7.png").unlink()  # gone after the rows were written
    with pytest.raises(ValueError, match="img7.png"):
        main(["train", "--dataset", str(tmp_path / "data.json"), "--output_dir", str(output), *QUICK])


URL = "http://127.0.0.1:9/cat.png"  # the discard port: refused at once, were it ever tried


@pytest.mark.parametrize("as_image_feature", [True, False])
def test_image_urls_are_refused_offline_before_training(tmp_path, monkeypatch, as_image_feature):
    split = Dataset.from_dict({"image": [URL, URL.replace("cat", "dog")] * 2, "question": ["What?"] * 4,
                               "answer": ["a cat", "a dog"] * 2})
    if as_image_feature:  # a path-only Image column: decoding would fetch the URL
        split = split.cast_column("image", ImageFeature())
    with monkeypatch.context() as patched:  # save_to_disk would itself ask the URLs for their size
        patched.setattr(Dataset, "_estimate_nbytes", lambda self: 1000)
        DatasetDict({"train": split}).save_to_disk(tmp_path / "saved")
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest
    with pytest.raises(ValueError, match="Row 0 of the train split .*the image is the URL 'http://127.0.0.1:9/"
                                         "(cat|dog).png', which offline mode \\(HF_HUB_OFFLINE=1\\) does not fetch"):
        main(["train", "--dataset", str(tmp_path / "saved"), "--output_dir", str(tmp_path / "run"), *QUICK])


@contextlib.contextmanager
def read_only(folder):
    """`folder` made read-only; as root (whom permission bits do not stop) also immutable (`chattr +i`)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        probe = folder / "probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("cannot make a read-only folder here")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_a_read_only_output_folder_is_refused_before_training(tmp_path):
    with read_only(tmp_path / "locked") as locked:
        for output in (locked, locked / "run"):
            with pytest.raises(ValueError, match=f"--output_dir {re.escape(str(output))} cannot be written .*nothing "
                                                 "was trained"):
                main(["train", "--output_dir", str(output), "--num_train_examples", "8", *QUICK])


def test_an_output_disk_without_room_for_a_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(ValueError, match=r"1 MiB free on its disk, but a checkpoint and the final model need about "
                                         r"\d+ MiB; nothing was trained"):
        main(["train", "--output_dir", str(tmp_path / "run"), "--num_train_examples", "8", "--num_test_examples", "2",
              "--num_validation_examples", "0", "--max_steps", "1", "--use_cpu", "true",
              "--vision_pretraining_steps", "0"])
    assert not list((tmp_path / "run").iterdir())


def test_a_checkpoint_of_another_architecture_is_refused_with_the_conversion_scripts(tmp_path):
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"--model_name_or_path .*llama is a `llama` checkpoint, not a SparseMoE-VLM "
                                         r"checkpoint.*conversion/upcycle_llava.py.*conversion/compose.py"):
        main(["train", "--model_name_or_path", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "run"),
              "--num_train_examples", "8", *QUICK])
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="MODEL_DIR .*is a `llama` checkpoint"):
        main(["evaluate", str(tmp_path / "llama")])
    with pytest.raises(SystemExit, match="Refusing to upload: The folder .*is a `llama` checkpoint.*conversion/"):
        main(["push", str(tmp_path / "llama"), "org/never"])


# -- 5. resuming -----------------------------------------------------------------------------------------------------

def fake_checkpoint(folder, step, run_id=None):
    """A complete checkpoint as the Trainer writes one (weights, optimizer, scheduler, RNG state, its state last)."""
    folder.mkdir(parents=True)
    save_file({"weight": torch.ones(4, 4)}, str(folder / "model.safetensors"))
    torch.save({"state": {0: torch.zeros(16)}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    if run_id:
        write_run_file(folder, run_id)
    TrainerState(global_step=step).save_to_json(str(folder / "trainer_state.json"))
    assert checkpoint_problem(folder) is None
    return folder


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_incomplete_checkpoints_are_named_and_last_falls_back_to_a_complete_one(tmp_path):
    run_id = write_run_file(tmp_path)
    for step in (4, 8, 12, 16, 20):
        fake_checkpoint(tmp_path / f"checkpoint-{step}", step, run_id)
    (tmp_path / "checkpoint-20" / "trainer_state.json").unlink()  # killed before the Trainer wrote its state
    truncate(tmp_path / "checkpoint-16" / "model.safetensors")
    truncate(tmp_path / "checkpoint-12" / "optimizer.pt", keep=0.9)
    assert checkpoint_problem(tmp_path / "checkpoint-20") == \
        "trainer_state.json is missing (the checkpoint was not completely written)"
    assert checkpoint_problem(tmp_path / "checkpoint-16").startswith("model.safetensors is truncated or corrupt")
    assert checkpoint_problem(tmp_path / "checkpoint-12").startswith("optimizer.pt is truncated or corrupt")
    checkpoint, skipped = find_last_checkpoint(tmp_path)
    assert checkpoint == tmp_path / "checkpoint-8"
    assert [line.split(":")[0] for line in skipped] == ["checkpoint-20", "checkpoint-16", "checkpoint-12"]
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text('{"global_st')
    assert checkpoint_problem(tmp_path / "checkpoint-8") == "trainer_state.json is truncated or corrupt"
    assert find_last_checkpoint(tmp_path)[0] == tmp_path / "checkpoint-4"


def test_last_passes_over_a_checkpoint_of_another_run(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-1000", 1000, run_id="an-older-run")
    run_id = write_run_file(tmp_path)  # this run started later, in the same folder
    fake_checkpoint(tmp_path / "checkpoint-200", 200, run_id)
    fake_checkpoint(tmp_path / "checkpoint-100", 100)  # written before runs were recorded: not ruled out
    checkpoint, skipped = find_last_checkpoint(tmp_path)
    assert checkpoint == tmp_path / "checkpoint-200"
    assert skipped == [f"checkpoint-1000: written by another run than the one last started in {tmp_path}"]


def test_resume_last_warns_and_refuses_clearly_when_nothing_can_be_resumed(tmp_path, capsys):
    output = tmp_path / "run"
    fake_checkpoint(output / "checkpoint-4", 4)
    truncate(output / "checkpoint-4" / "model.safetensors")
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint last: no checkpoint in .* that can be resumed "
                                         r"\(checkpoint-4: incomplete, model.safetensors is truncated"):
        main(["train", "--output_dir", str(output), "--resume_from_checkpoint", "last", *QUICK])
    assert "passes over checkpoint-4: incomplete" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt"])
def test_resuming_a_truncated_checkpoint_names_the_file(tmp_path, name):
    checkpoint = fake_checkpoint(tmp_path / "run" / "checkpoint-8", 8)
    truncate(checkpoint / name)
    with pytest.raises(ValueError, match=f"Cannot resume from {re.escape(str(checkpoint))}: {re.escape(name)} is "
                                         "truncated or corrupt .*Resume from an earlier checkpoint"):
        main(["train", "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", str(checkpoint), *QUICK])


def test_a_new_run_in_a_folder_with_checkpoints_of_an_earlier_run_is_refused_unless_overwrite(tmp_path):
    output = tmp_path / "run"
    fake_checkpoint(output / "checkpoint-1000", 1000, run_id="earlier")
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-1000\). Continue that run "
                                         "with --resume_from_checkpoint last, .*--overwrite_output_dir true"):
        main(["train", "--output_dir", str(output), "--num_train_examples", "8", *QUICK])
    assert (output / "checkpoint-1000").is_dir()
    # With --overwrite_output_dir they are deleted first (the missing data file then stops this run).
    with pytest.raises(FileNotFoundError, match="Dataset not found"):
        main(["train", "--output_dir", str(output), "--overwrite_output_dir", "true", "--dataset",
              str(tmp_path / "nothing.json"), *QUICK])
    assert not (output / "checkpoint-1000").exists()


def test_a_resumed_run_takes_the_checkpoints_tokenizer_and_config_not_one_from_the_new_data(tmp_path):
    processor, model = make_processor_and_model()
    checkpoint = tmp_path / "run" / "checkpoint-8"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    changed = Dataset.from_dict({"question": ["zebra quokka axolotl?"] * 8, "answer": ["narwhal pangolin"] * 8})
    resumed_model, resumed = _build_model_and_processor(ModelArguments(), changed, checkpoint)
    assert resumed.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert resumed_model.config.to_dict() == model.config.to_dict()  # not the preset's
    _, retrained = _build_model_and_processor(ModelArguments(), changed)  # what resuming used to do
    assert retrained.tokenizer.get_vocab() != processor.tokenizer.get_vocab()


def test_the_card_says_what_a_partial_expert_load_plot_covers(tmp_path):
    from hf_sparsemoe_vlm.app.model_card import build_model_card

    folder = fake_run(tmp_path / "run")
    run_args = json.loads((folder / "run_args.json").read_text())
    (folder / "run_args.json").write_text(json.dumps({**run_args, "expert_load_steps": [1, 3000]}))
    whole = build_model_card(make_model(), "org/x", run_dir=folder).text
    assert "per sparse layer and modality group:" in whole and "kept no routing counts" not in whole
    (folder / "run_args.json").write_text(json.dumps({**run_args, "expert_load_steps": [2001, 3000]}))
    partial = build_model_card(make_model(), "org/x", run_dir=folder).text
    assert "(steps 2001 to 3000 of 3000 only: the run resumed from a checkpoint that kept no routing counts)" in partial


# A tiny synthetic run: stage 0 skipped, a handful of steps.
TINY_RUN = ["--max_steps", "6", "--save_steps", "3", "--save_total_limit", "10", "--num_train_examples", "48",
            "--num_validation_examples", "0", "--num_test_examples", "2", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "4", "--max_new_tokens", "1", "--logging_steps", "3", "--image_size",
            "32", "--use_cpu", "true", "--disable_tqdm", "true", "--vision_pretraining_steps", "0",
            "--report_to", "none"]


def test_a_fault_mid_training_saves_what_was_trained_and_last_resumes_it_with_tokenizer_and_routing_counts(
        tmp_path, monkeypatch, capsys):
    from hf_sparsemoe_vlm.app.training import VLMDataCollator

    output = tmp_path / "run"
    collate, calls = VLMDataCollator.__call__, []

    def failing(self, batch):  # the 6th batch fails (e.g. an image that cannot be decoded): steps 1-4 ran (the
        calls.append(1)        # data loader builds one batch ahead)
        if len(calls) == 6:
            raise OSError("image file is truncated (3 bytes not processed)")
        return collate(self, batch)

    monkeypatch.setattr(VLMDataCollator, "__call__", failing)
    with pytest.raises(OSError, match="image file is truncated"):
        main(["train", "--output_dir", str(output), *TINY_RUN])
    err = capsys.readouterr().err
    assert f"training stopped at step 4 (OSError: image file is truncated (3 bytes not processed)); saved what was " \
           f"trained to {output / 'checkpoint-4'}" in err and "--resume_from_checkpoint last" in err
    assert checkpoint_problem(output / "checkpoint-4") is None and checkpoint_problem(output / "checkpoint-3") is None
    assert read_run_id(output / "checkpoint-4") == read_run_id(output) is not None
    counts_at_4 = load_expert_load(output / "checkpoint-4")
    assert counts_at_4 and all(counts.sum() > 0 for counts in counts_at_4.values())
    monkeypatch.setattr(VLMDataCollator, "__call__", collate)

    # A new run may not start over it; resuming takes checkpoint-4, even with other questions now (the tokenizer is
    # the checkpoint's, not one trained on the new texts).
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        main(["train", "--output_dir", str(output), *TINY_RUN])
    main(["train", "--output_dir", str(output), *TINY_RUN, "--resume_from_checkpoint", "last",
          "--question_types", "count"])
    assert "resuming from " + str(output / "checkpoint-4") in capsys.readouterr().out
    assert (output / "tokenizer.json").read_text() == (output / "checkpoint-4" / "tokenizer.json").read_text()
    assert TrainerState.load_from_json(str(output / "trainer_state.json")).global_step == 6
    # The routing counts continue those of steps 1-4: the plot (and the card) cover the whole run.
    counts_at_6 = load_file(str(output / "checkpoint-6" / EXPERT_LOAD_FILE))
    for group, counts in counts_at_4.items():
        assert (counts_at_6[group] >= counts).all() and counts_at_6[group].sum() > counts.sum()
    assert json.loads((output / "run_args.json").read_text())["expert_load_steps"] == [1, 6]
    card = (output / "README.md").read_text()
    assert "per sparse layer and modality group:" in card and "kept no routing counts" not in card


# -- 6. push against a Hub that stops answering ----------------------------------------------------------------------

@pytest.mark.slow
def test_push_gives_up_on_a_hub_that_stops_answering_mid_commit_and_says_what_to_retry(hub_server, tmp_path):
    processor, model = make_processor_and_model()
    folder = tmp_path / "run"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    script = textwrap.dedent(f"""
        from hf_sparsemoe_vlm.app.cli import main
        main(["push", {str(folder)!r}, "org/stalled-push", "--timeout", "2"])
    """)
    hub_server.release.clear()
    hub_server.stall = re.compile(r"^POST /api/models/org/stalled-push/commit/")
    try:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-c", script], env=hub_server.env(tmp_path / "hf_home"),
                                capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
    finally:
        hub_server.stall = None
        hub_server.release.set()
    assert result.returncode != 0 and elapsed < 60, (elapsed, result.stderr[-2000:])
    assert any(method == "POST" and "stalled-push/commit/" in path and status is None
               for method, path, status in hub_server.requests)  # it did hang the commit
    assert "timed out: the Hub did not answer for 2 s while trying to upload the files" in result.stderr
    assert "either all of the folder's files landed or none did" in result.stderr
    assert "run the same push again" in result.stderr and "/org/stalled-push/commits/main" in result.stderr
    assert "model.safetensors" not in hub_server.files("org/stalled-push")
