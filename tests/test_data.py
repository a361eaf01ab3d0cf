import json

import PIL.Image
import pytest
from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature

from hf_sparsemoe_vlm.app.cli import main
from hf_sparsemoe_vlm.app.data import load_vlm_dataset
from hf_sparsemoe_vlm.app.training import VLMDataCollator

from tiny_models import make_processor_and_model


COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0)}


def write_images(folder, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        PIL.Image.new("RGB", (16, 16), COLOURS[name]).save(folder / f"img{i}.png")
        rows.append({"file": f"img{i}.png", "colour": name})
    return rows


def test_jsonl_with_relative_image_paths_and_custom_columns(tmp_path):
    rows = write_images(tmp_path / "images")
    lines = [json.dumps({"picture": f"images/{r['file']}", "prompt": "What colour?", "target": r["colour"]})
             for r in rows]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    dataset = load_vlm_dataset(str(tmp_path / "data.jsonl"), image_column="picture", question_column="prompt",
                               answer_column="target")
    assert set(dataset) == {"train", "validation", "test"}
    assert sum(len(split) for split in dataset.values()) == 12 and len(dataset["train"]) >= 8
    row = dataset["train"][0]
    assert isinstance(row["image"], PIL.Image.Image) and row["question"] == "What colour?"
    assert row["answer"] == [name for name, rgb in COLOURS.items() if rgb == row["image"].getpixel((0, 0))][0]


def test_imagefolder_with_metadata(tmp_path):
    rows = write_images(tmp_path / "folder" / "train")
    with open(tmp_path / "folder" / "train" / "metadata.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"file_name": r["file"], "question": "Colour?", "answer": r["colour"]}) + "\n")
    dataset = load_vlm_dataset(str(tmp_path / "folder"))
    assert isinstance(dataset["train"].features["image"], ImageFeature)
    assert sum(len(split) for split in dataset.values()) == 12


def test_saved_dataset_folder(tmp_path):
    images = [PIL.Image.new("RGB", (8, 8), rgb) for rgb in COLOURS.values()]
    split = Dataset.from_dict({"image": images * 2, "question": ["Colour?"] * 6, "answer": list(COLOURS) * 2})
    split = split.cast_column("image", ImageFeature())
    DatasetDict({"train": split, "validation": split.select([0]), "test": split.select([1, 2])}).save_to_disk(
        tmp_path / "saved")
    dataset = load_vlm_dataset(str(tmp_path / "saved"))
    assert (len(dataset["train"]), len(dataset["validation"]), len(dataset["test"])) == (6, 1, 2)


def test_llava_conversations_become_chat_messages(tmp_path):
    rows = write_images(tmp_path / "images", n=4)
    records = [{"id": str(i), "image": f"images/{r['file']}", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": r["colour"]},
        {"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "yes"}]} for i, r in enumerate(rows)]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    dataset = load_vlm_dataset(str(tmp_path / "llava.json"), validation_fraction=0, test_fraction=0)
    row = dataset["train"][0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
    processor, model = make_processor_and_model()
    collator = VLMDataCollator(processor)
    batch = collator([dataset["train"][i] for i in range(2)])
    learned = processor.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    assert learned.startswith(f"{row_colour(dataset['train'][0])}<|end|>") and learned.endswith("yes<|end|>")
    assert (batch["input_ids"] == processor.image_token_id).sum() == 2 * model.config.image_seq_length
    assert collator.reference(row) == "yes"
    prompt = collator.conversation(row, with_answer=False)
    assert prompt[-1]["role"] == "user" and len(prompt) == 3


def row_colour(row):
    return [m for m in row["messages"] if m["role"] == "assistant"][0]["content"][0]["text"]


def test_missing_column_is_named(tmp_path):
    write_images(tmp_path / "images", n=3)
    (tmp_path / "data.json").write_text(json.dumps([{"image": "images/img0.png", "question": "q"}] * 3))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answer'\]"):
        load_vlm_dataset(str(tmp_path / "data.json"))
    (tmp_path / "noimage.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="Row 0 .*no `image` field"):
        load_vlm_dataset(str(tmp_path / "noimage.json"))


def test_missing_image_file_and_empty_answer_name_the_row(tmp_path):
    write_images(tmp_path / "images", n=2)
    rows = [{"image": "images/img0.png", "question": "q", "answer": "a"},
            {"image": "images/gone.png", "question": "q", "answer": "a"}]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="Row 1 .*image file not found.*gone.png"):
        load_vlm_dataset(str(tmp_path / "data.json"))
    rows[1] = {"image": "images/img1.png", "question": "q", "answer": "  "}
    (tmp_path / "data.json").write_text(json.dumps(rows * 3))
    with pytest.raises(ValueError, match="Row .* empty or non-text `answer`"):
        load_vlm_dataset(str(tmp_path / "data.json"))


def test_conversation_without_assistant_turn_is_named(tmp_path):
    write_images(tmp_path / "images", n=2)
    records = [{"image": "images/img0.png", "conversations": [{"from": "human", "value": "<image> hi"},
                                                              {"from": "gpt", "value": "red"}]},
               {"image": "images/img1.png", "conversations": [{"from": "human", "value": "<image> hello?"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="Row 1 .*no assistant \\(gpt\\) turn"):
        load_vlm_dataset(str(tmp_path / "llava.json"))


def test_unreadable_image_fails_loudly_when_the_batch_is_built(tmp_path):
    write_images(tmp_path / "images", n=3)
    (tmp_path / "images" / "img1.png").write_bytes(b"not a png")
    rows = [{"image": f"images/img{i}.png", "question": "Colour?", "answer": "red"} for i in range(3)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    dataset = load_vlm_dataset(str(tmp_path / "data.json"), validation_fraction=0, test_fraction=0)
    processor, _ = make_processor_and_model()
    with pytest.raises(Exception, match="img1.png|cannot identify image"):
        VLMDataCollator(processor)([dataset["train"][i] for i in range(3)])


def test_unknown_sources_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="Dataset not found"):
        load_vlm_dataset(str(tmp_path / "nothing"))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_vlm_dataset(str(tmp_path / "data.csv"))
    (tmp_path / "broken.json").write_text('[{"image": "a.png", "question": ')
    with pytest.raises(ValueError, match="broken.json: cannot be read as a JSON list of rows"):
        load_vlm_dataset(str(tmp_path / "broken.json"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty.json: cannot be read as a JSON list of rows .*empty or malformed"):
        load_vlm_dataset(str(tmp_path / "empty.json"))


@pytest.mark.slow
def test_cli_trains_on_a_json_dataset(tmp_path):
    rows = write_images(tmp_path / "images", n=20)
    (tmp_path / "data.json").write_text(json.dumps(
        [{"image": f"images/{r['file']}", "question": "What colour?", "answer": r["colour"]} for r in rows]))
    output = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "data.json"), "--output_dir", str(output), "--max_steps", "3",
                 "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_new_tokens", "3",
                 "--save_strategy", "no", "--use_cpu", "true", "--dataset_hub_id", "org/colour-vqa"]) == 0
    metrics = json.loads((output / "all_results.json").read_text())
    assert "test_exact_match" in metrics and (output / "model.safetensors").exists()
    # The card names the Hub dataset in its metadata and results, and the local file only by its name.
    from huggingface_hub import ModelCard

    card = ModelCard.load(output / "README.md")
    assert card.data.datasets == ["org/colour-vqa"]
    assert {r.dataset_type for r in card.data.eval_results} == {"org/colour-vqa"}
    card_lines = (output / "README.md").read_text().splitlines()
    # Only the snippets' load calls name the run folder (by the path it was given; push writes the repo id there).
    assert all(f'("{output}"' in line or f'"{output}",' in line for line in card_lines if str(tmp_path) in line)
