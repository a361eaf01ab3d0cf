# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""Training data for `sparsemoe-vlm train`: the synthetic default, or any image + text dataset on disk (a
`save_to_disk` folder, an `imagefolder` with `metadata.jsonl`, JSON / JSONL files with image paths, LLaVA-style
conversation JSON). Every source becomes rows of `image`, `question`, `answer` and, for conversations, `messages`."""

import os
from pathlib import Path

from datasets import Dataset, DatasetDict, Image, load_dataset, load_from_disk


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# Where LLaVA-format conversations put the image (fixed by that data format, whatever the model's own image token).
LLAVA_IMAGE_PLACEHOLDER = "<image>"


def _llava_messages(record: dict, index: int, source: str) -> list[dict]:
    """LLaVA `conversations` -> chat messages; the `<image>` placeholder becomes an image item."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"Row {index} of {source}: `conversations` must be a non-empty list of turns.")
    messages = []
    for turn in conversations:
        role = LLAVA_ROLES.get(str(turn.get("from", "")).lower())
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"Row {index} of {source}: each turn needs `from` (one of {sorted(LLAVA_ROLES)}) and a "
                             f"string `value`; got {turn!r}.")
        text = turn["value"]
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


def _from_json(path: Path, image_column: str) -> Dataset:
    """JSON / JSONL rows with an image path, read by `load_dataset("json")`; LLaVA conversation files are recognised
    by their `conversations` field."""
    try:
        rows = load_dataset("json", data_files=str(path), split="train")
    except Exception as error:  # malformed JSON, or a field whose values mix types (pyarrow cannot type it)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: cannot be read as a JSON list of rows (or JSONL, one row per line); it is empty "
                         f"or malformed ({reason}).") from None
    conversations = "conversations" in rows.column_names

    def prepare(row: dict, index: int) -> dict:
        if row.get(image_column) is None:
            raise ValueError(f"Row {index} of {path}: no `{image_column}` field (fields: "
                             f"{sorted(k for k, v in row.items() if v is not None)}). Pass --image_column to name the "
                             "image path field.")
        image = _resolve(str(row[image_column]), path.parent, index, str(path))
        if conversations:
            return {image_column: image, "messages": _llava_messages(row, index, str(path))}
        return {image_column: image}

    kept = [image_column, "messages"] if conversations else rows.column_names
    rows = rows.map(prepare, with_indices=True, remove_columns=[c for c in rows.column_names if c not in kept])
    return rows.cast_column(image_column, Image())


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
            empty = [i for i, value in enumerate(split[column]) if not isinstance(value, str) or not value.strip()]
            if empty:
                raise ValueError(f"Row {empty[0]} of {source} ({name} split): empty or non-text `{column}`.")
    return split


def _load_source(source: str, image_column: str) -> DatasetDict:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"Dataset not found: {source!r} (expected `synthetic`, a folder or a .json/.jsonl file).")
    if path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise ValueError(f"{source}: unsupported file type {path.suffix!r}; use .json or .jsonl.")
        loaded = _from_json(path, image_column)
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
    splits = _load_source(source, image_column)
    if "train" not in splits:
        raise ValueError(f"{source}: no `train` split (splits: {sorted(splits)}).")
    name = Path(source).name
    origins = {split: f"the `{split}` split of {name}" for split in splits}
    labels = dict.fromkeys(splits, source)  # what errors call each split's data
    for split, given in (("validation", validation_source), ("test", test_source)):
        if given is not None:
            extra = _load_source(given, image_column)
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


__all__ = ["load_vlm_dataset", "load_vlm_splits"]
