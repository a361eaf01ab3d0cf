# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Training data for `sparsemoe-vlm train`: the synthetic default, or any image + text dataset on disk (a
`save_to_disk` folder, an `imagefolder` with `metadata.jsonl`, JSON / JSONL files with image paths, LLaVA-style
conversation JSON). Every source becomes rows of `image`, `question`, `answer` and, for conversations, `messages`."""

import io
import json
import os
from pathlib import Path

import PIL.Image
from datasets import Dataset, DatasetDict, Image, Value, load_dataset, load_from_disk
from huggingface_hub import constants


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# Where LLaVA-format conversations put the image (fixed by that data format, whatever the model's own image token).
LLAVA_IMAGE_PLACEHOLDER = "<image>"


def _llava_messages(record: dict, index: int, source: str) -> list[dict]:
    """LLaVA `conversations` -> chat messages; the `<image>` placeholder becomes an image item."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"Row {index} of {source}: `conversations` must be a non-empty list of turns.")
    placeholders = [i for i, turn in enumerate(conversations)
                    if isinstance(turn, dict) and LLAVA_IMAGE_PLACEHOLDER in str(turn.get("value", ""))]
    count = sum(str(conversations[i].get("value", "")).count(LLAVA_IMAGE_PLACEHOLDER) for i in placeholders)
    if count > 1:
        raise ValueError(f"Row {index} of {source}: the conversation has {count} `{LLAVA_IMAGE_PLACEHOLDER}` "
                         f"placeholders but a row has one image (its image field). Keep one "
                         f"`{LLAVA_IMAGE_PLACEHOLDER}`, in the human turn that shows the image, or split the row.")
    messages = []
    for turn in conversations:
        role = LLAVA_ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"Row {index} of {source}: each turn needs `from` (one of {sorted(LLAVA_ROLES)}) and a "
                             f"string `value`; got {turn!r}.")
        text = turn["value"]
        if role != "user" and LLAVA_IMAGE_PLACEHOLDER in text:
            raise ValueError(f"Row {index} of {source}: `{LLAVA_IMAGE_PLACEHOLDER}` in a {turn['from']!r} turn; the "
                             "image belongs in a human turn. Move the placeholder there.")
        if role == "user" and LLAVA_IMAGE_PLACEHOLDER in text:
            before, _, after = text.partition(LLAVA_IMAGE_PLACEHOLDER)
            content = [{"type": "text", "text": before.strip()}] if before.strip() else []
            content += [{"type": "image"}, {"type": "text", "text": after.strip()}]
        else:
            content = [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"Row {index} of {source}: the conversation has no assistant (gpt) turn, so there is nothing "
                         "to learn from it. Remove the row or add the answer.")
    return messages


def _resolve(path: str, base: Path, index: int, source: str) -> str:
    resolved = Path(path) if os.path.isabs(path) else base / path
    if not resolved.is_file():
        raise ValueError(f"Row {index} of {source}: image file not found: {str(resolved)!r}.")
    return str(resolved)


def _json_kind(value) -> str | None:
    """The JSON type of a value, as errors name it (None for null)."""
    if value is None:
        return None
    for kind, types in (("true/false", bool), ("number", (int, float)), ("string", str), ("list", list),
                        ("object", dict)):
        if isinstance(value, types):
            return kind
    return type(value).__name__


def _read_json_rows(path: Path) -> list[dict]:
    """The rows of a JSON file (a list of objects) or a JSONL file (one object per line; a `.json` file may be JSONL
    too). Errors name the file and, for JSONL, the line."""
    malformed = f"{path}: cannot be read as a JSON list of rows (or JSONL, one row per line)"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{malformed}: it is not UTF-8 text ({error}). Save it as UTF-8.") from None
    value, lines = None, None
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # "Extra data": a complete first object, then more: JSON Lines
                raise ValueError(f"{malformed}: it is empty or malformed ({error.msg} at line {error.lineno}, column "
                                 f"{error.colno}). Fix the file there.") from None
    if value is None:
        lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        value = []
        for number, line in lines:
            try:
                value.append(json.loads(line))
            except json.JSONDecodeError as error:
                last = " (the last line: was the file completely written?)" if number == lines[-1][0] else ""
                raise ValueError(f"{path}, line {number}: not a complete JSON object ({error.msg} at column "
                                 f"{error.colno}){last}. Each line of a JSONL file must be one JSON object; fix or "
                                 f"remove that line.") from None
    if isinstance(value, dict):
        nested = [key for key, item in value.items() if isinstance(item, list) and item and isinstance(item[0], dict)]
        hint = (f" The rows seem to be under `{nested[0]}`: save that list as the whole file." if len(nested) == 1
                else " Save the rows as a list: [{...}, {...}].")
        raise ValueError(f"{malformed}: it holds one JSON object, not a list of rows.{hint}")
    if not isinstance(value, list):
        raise ValueError(f"{malformed}: it holds a JSON {_json_kind(value)}, not a list of rows (objects).")
    if not value:
        raise ValueError(f"{malformed}: it is empty or malformed (it holds no rows).")
    for index, row in enumerate(value):
        if not isinstance(row, dict):
            where = f"line {lines[index][0]}" if lines else f"row {index}"
            raise ValueError(f"{path}, {where}: a row must be a JSON object with named fields, got a JSON "
                             f"{_json_kind(row)} ({json.dumps(row)[:60]}).")
    return value


def _from_json(path: Path, image_column: str, text_columns: tuple[str, ...] = ()) -> Dataset:
    """JSON / JSONL rows with an image path; LLaVA conversation files are recognised by their `conversations` field.
    Numbers in `text_columns` (questions, answers) become text; a file mixing conversation and question / answer
    rows, or a field whose values mix types, is refused naming the row."""
    records = _read_json_rows(path)
    conversation = next((i for i, row in enumerate(records) if row.get("conversations") is not None), None)
    rows = []
    for index, record in enumerate(records):
        if record.get(image_column) is None:
            raise ValueError(f"Row {index} of {path}: no `{image_column}` field (fields: "
                             f"{sorted(k for k, v in record.items() if v is not None)}). Pass --image_column to name "
                             "the image path field.")
        image = _resolve(str(record[image_column]), path.parent, index, str(path))
        if conversation is not None:
            if record.get("conversations") is None:
                raise ValueError(
                    f"Row {index} of {path}: a row without `conversations` in a file of LLaVA conversations (row "
                    f"{conversation} has them); one file holds one kind of row. Write the row as a conversation "
                    f'([{{"from": "human", "value": "<image>\\nQUESTION"}}, {{"from": "gpt", "value": "ANSWER"}}]) '
                    "or put the question / answer rows in a file of their own (e.g. --eval_dataset).")
            rows.append({image_column: image, "messages": _llava_messages(record, index, str(path))})
            continue
        row = dict(record, **{image_column: image})
        for column in text_columns:
            if _json_kind(row.get(column)) == "number":  # e.g. `"answer": 3`: the answer text is "3"
                row[column] = str(row[column])
        rows.append(row)
    kinds: dict[str, tuple[str, int]] = {}
    for index, row in enumerate(rows):
        for key, value in row.items():
            kind = _json_kind(value)
            if kind is not None and kinds.setdefault(key, (kind, index))[0] != kind:
                first_kind, first = kinds[key]
                raise ValueError(f"Row {index} of {path}: field `{key}` is a {kind} here but a {first_kind} in row "
                                 f"{first}; give it one type in every row (e.g. all strings).")
    try:
        dataset = Dataset.from_list(rows)
    except Exception as error:  # nested fields whose structure differs between rows (pyarrow cannot type them)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: the rows' fields do not have one structure in every row ({reason}). Give each "
                         "field the same shape in every row.") from None
    return dataset.cast_column(image_column, Image())


def _split(dataset: Dataset, seed: int, validation_fraction: float, test_fraction: float) -> DatasetDict:
    """Carve validation and test rows out of `dataset` with `train_test_split` (at least one each when asked, if the
    data allows)."""
    n = len(dataset)
    n_validation = max(1, round(n * validation_fraction)) if validation_fraction > 0 and n >= 3 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 and n - n_validation >= 2 else 0
    if n_validation + n_test == 0:
        return DatasetDict({"train": dataset, "validation": dataset.select([]), "test": dataset.select([])})
    carved = dataset.train_test_split(test_size=n_validation + n_test, seed=seed)
    held_out = carved["test"]
    return DatasetDict({"train": carved["train"], "validation": held_out.select(range(n_validation)),
                        "test": held_out.select(range(n_validation, n_validation + n_test))})


def _standardise(split: Dataset, source: str, name: str, image_column: str, question_column: str,
                 answer_column: str, caption_column: str | None = None) -> Dataset:
    """Check the columns and texts of one split (errors name the row) and rename them to image/question/answer (and
    caption). With `caption_column` (retrieval) an image and a caption per row are what is required."""
    columns = set(split.column_names)
    if caption_column is not None:
        required, options = [image_column, caption_column], "--image_column / --caption_column"
    else:
        required = [image_column] + ([] if "messages" in columns else [question_column, answer_column])
        options = "--image_column / --question_column / --answer_column"
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{source} ({name} split): missing column(s) {missing}; columns are {sorted(columns)}. "
                         f"Name them with {options}.")
    renames = {image_column: "image", question_column: "question", answer_column: "answer"}
    if caption_column is not None:
        renames[caption_column] = "caption"
    split = split.rename_columns({old: new for old, new in renames.items() if old in columns and old != new})
    for column in ("question", "answer", "caption"):
        if column in split.column_names:
            feature = split.features[column]
            if isinstance(feature, Value) and feature.dtype.startswith(("int", "uint", "float")):
                split = split.cast_column(column, Value("string"))  # numeric answers (`3`) are the text "3"
            values = split[column]
            empty = [i for i, value in enumerate(values) if not isinstance(value, str) or not value.strip()]
            if empty:
                raise ValueError(f"Row {empty[0]} of {source} ({name} split): empty or non-text `{column}`.")
            if column != "caption":
                literal = next((i for i, value in enumerate(values) if LLAVA_IMAGE_PLACEHOLDER in value), None)
                if literal is not None:
                    raise ValueError(
                        f"Row {literal} of {source} ({name} split): the `{column}` contains "
                        f"`{LLAVA_IMAGE_PLACEHOLDER}`. A question / answer row gets its one image from the image "
                        f"column (placed by --prompt_order), so the literal would ask for a second image. Remove it "
                        f"from the text, or write the row as a LLaVA conversation.")
    return split


def _load_source(source: str, image_column: str, text_columns: tuple[str, ...] = ()) -> DatasetDict:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"Dataset not found: {source!r} (expected `synthetic`, a folder or a .json/.jsonl file).")
    if path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise ValueError(f"{source}: unsupported file type {path.suffix!r}; use .json or .jsonl.")
        loaded = _from_json(path, image_column, text_columns)
    elif (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        loaded = load_from_disk(str(path))
    else:
        loaded = load_dataset("imagefolder", data_dir=str(path))
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def load_vlm_splits(source: str, image_column: str = "image", question_column: str = "question",
                    answer_column: str = "answer", seed: int = 0, validation_fraction: float = 0.05,
                    test_fraction: float = 0.05, validation_source: str | None = None,
                    test_source: str | None = None, caption_column: str | None = None
                    ) -> tuple[DatasetDict, dict[str, str]]:
    """`load_vlm_dataset`, and where each split comes from (`{"train": ..., "validation": ..., "test": ...}`, one
    line each, for logs and model cards: the source's own split, a given file, or rows carved from train). With
    `caption_column` every split needs an image and a caption per row (renamed `caption`), questions optional."""
    columns = (image_column, question_column, answer_column, caption_column)
    text_columns = tuple(c for c in columns[1:] if c)
    splits = _load_source(source, image_column, text_columns)
    if "train" not in splits:
        raise ValueError(f"{source}: no `train` split (splits: {sorted(splits)}).")
    name = Path(source).name
    origins = {split: f"the `{split}` split of {name}" for split in splits}
    labels = dict.fromkeys(splits, source)  # what errors call each split's data
    for split, given in (("validation", validation_source), ("test", test_source)):
        if given is not None:
            extra = _load_source(given, image_column, text_columns)
            if len(extra) != 1 and split not in extra:
                raise ValueError(f"{given}: has splits {sorted(extra)}; give a file or folder with one split (or a "
                                 f"`{split}` split) as the {split} data.")
            splits[split] = extra[split] if split in extra else next(iter(extra.values()))
            origins[split] = labels[split] = f"{Path(given).name} (given as the {split} set)"
    splits = DatasetDict({split: _standardise(data, labels[split], split, *columns)
                          for split, data in splits.items() if split in ("train", "validation", "test")})
    missing = [split for split in ("validation", "test") if split not in splits]
    if missing:
        fractions = {"validation": validation_fraction, "test": test_fraction}
        carved = _split(splits["train"], seed, *(fractions[s] if s in missing else 0.0 for s in ("validation", "test")))
        splits["train"] = carved["train"]
        for split in missing:
            splits[split] = carved[split]
            origins[split] = (f"{len(carved[split])} rows ({fractions[split]:.0%}) carved from the training rows of "
                              f"{name} (shuffle seed {seed}); pass --{'eval' if split == 'validation' else split}"
                              f"_dataset to give a {split} set")
        origins["train"] = f"the rest of {name}'s training rows"
    return DatasetDict({split: splits[split] for split in ("train", "validation", "test")}), origins


def load_vlm_dataset(source: str, image_column: str = "image", question_column: str = "question",
                     answer_column: str = "answer", seed: int = 0, validation_fraction: float = 0.05,
                     test_fraction: float = 0.05, validation_source: str | None = None,
                     test_source: str | None = None) -> DatasetDict:
    """Load `source` (a `save_to_disk` folder, an imagefolder directory, a .json/.jsonl file) as train /
    validation / test splits with columns `image`, `question`, `answer` (and `messages` for conversations).
    `validation_source` / `test_source` give those splits from their own file or folder; splits neither the source
    has nor are given are carved from train (`validation_fraction` / `test_fraction`, shuffled with `seed`). A
    missing column, image or assistant turn raises a `ValueError` naming the row; nothing is skipped silently."""
    return load_vlm_splits(source, image_column, question_column, answer_column, seed, validation_fraction,
                           test_fraction, validation_source, test_source)[0]


def _image_problem(value, offline: bool) -> str | None:
    """Why an image value (a path, a URL, an `Image(decode=False)` dict, a PIL image) cannot be used, or None. Files
    are opened (PIL reads the header), not decoded."""
    if isinstance(value, PIL.Image.Image):
        return None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, str | os.PathLike):
        data, path = None, os.fspath(value)
    else:
        return f"not an image or an image path ({type(value).__name__})"
    if data is None and not path:
        return "no image"
    if data is None and path.startswith(("http://", "https://")):
        if offline:
            return (f"the image is the URL {path!r}, which offline mode (HF_HUB_OFFLINE=1) does not fetch. Download "
                    "the images and point the rows at the files, or unset HF_HUB_OFFLINE")
        return None  # fetched when the batch is built
    try:
        with PIL.Image.open(io.BytesIO(data) if data is not None else path):
            return None
    except FileNotFoundError:
        return f"image file not found: {path!r}"
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        where = f"the image file {path!r}" if data is None else "the embedded image" + (f" ({path})" if path else "")
        return f"{where} cannot be opened as an image ({error})"


def check_images(dataset: DatasetDict, labels: dict[str, str] | None = None, column: str = "image",
                 splits: tuple[str, ...] | None = None) -> None:
    """Open (without decoding) every image of `splits` (default: all) before anything trains on them: a missing or
    unreadable file, or an image URL in offline mode, raises a `ValueError` naming the split, the row and the file.
    `labels` names each split's data in the message (default: the split name)."""
    offline = constants.is_offline_mode()
    for name in splits or tuple(dataset):
        split = dataset[name]
        if column not in split.column_names or not len(split):
            continue
        if isinstance(split.features[column], Image):
            split = split.cast_column(column, Image(decode=False))  # paths and bytes, nothing decoded
        for start, batch in zip(range(0, len(split), 256), split.select_columns([column]).iter(batch_size=256),
                                strict=True):
            for offset, value in enumerate(batch[column]):
                problem = _image_problem(value, offline)
                if problem:
                    label = (labels or {}).get(name, name)
                    raise ValueError(f"Row {start + offset} of the {name} split ({label}): {problem}. Fix or remove "
                                     "the row, then run again.")


__all__ = ["check_images", "load_vlm_dataset", "load_vlm_splits"]
