# Copyright 2026 The hf_sparsemoe_vlm authors.
# Licensed under the Apache License, Version 2.0.
"""SparseMoE-VLM processor (image processor + tokenizer + chat template), and a way to build one from scratch
offline: a byte-level BPE tokenizer trained on your own texts."""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .image_processing_sparsemoe_vlm import SparseMoEVLMImageProcessor


IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "<|end|>",  # ends every turn: generation stops there
    "unk_token": "<unk>",
}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# `build_tokenizer` gives these ids 0, 1, 2, ... in this order.
BUILT_TOKENIZER_SPECIAL_TOKENS = [*SPECIAL_TOKENS.values(), IMAGE_TOKEN, *ROLE_TOKENS]

# Turns are `<|role|>\n...<|end|>\n`; assistant turns (their end token included) are wrapped in
# {% generation %} so `return_assistant_tokens_mask=True` marks exactly what a model should learn to produce.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    f"{{%- if item['type'] == 'image' -%}}{{{{ '{IMAGE_TOKEN}' }}}}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ('system', 'user', 'assistant') -%}"
    "{{ raise_exception('Unknown chat role ' ~ message['role'] ~ ': use system, user or assistant.') }}"
    "{%- endif -%}"
    "{{ '<|' ~ message['role'] ~ '|>\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ render(message['content']) }}{{ eos_token }}{% endgeneration %}"
    "{%- else -%}{{ render(message['content']) }}{{ eos_token }}"
    "{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (offline, with the `tokenizers` library).

    The result has the special tokens the model needs: `<pad>`, `<s>` (BOS, added in front of every text),
    `<|end|>` (EOS, closes each chat turn), `<unk>`, `<image>` and the chat role markers. Any text can be
    encoded (byte-level), words never seen in training just take more tokens.
    """
    specials = BUILT_TOKENIZER_SPECIAL_TOKENS
    if vocab_size < len(specials) + 256:
        raise ValueError(f"`vocab_size` ({vocab_size}) must be at least {len(specials) + 256}: "
                         f"{len(specials)} special tokens + 256 byte tokens.")
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, extra_special_tokens={"image_token": IMAGE_TOKEN}, **SPECIAL_TOKENS
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *ROLE_TOKENS]})
    return tokenizer


def _check_encodable(text: str, index: int) -> None:
    """Lone surrogates (from bytes decoded with `errors="surrogateescape"`, or a broken `\\ud83d` JSON escape) are not
    valid Unicode: the tokenizer fails on them with an unrelated `TypeError`."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"`text`[{index}] has a lone surrogate {text[error.start]!r} at character {error.start} (context: "
            f"{text[max(error.start - 20, 0) : error.start + 20]!r}), which is not valid Unicode: fix the text's "
            "decoding, or drop such characters with `text.encode('utf-8', 'replace').decode('utf-8')`."
        ) from None


class SparseMoEVLMProcessor(ProcessorMixin):
    r"""
    Wraps a [`SparseMoEVLMImageProcessor`] and a tokenizer into one processor.

    Each `<image>` placeholder in the text is expanded to `image_seq_length` image tokens (one per image feature of
    the vision tower); the output holds `input_ids`, `attention_mask`, `mm_token_type_ids` (1 at image tokens) and
    `pixel_values`. Several images per prompt and batches of prompts are supported (pass `padding=True`; the
    tokenizer pads on the left, as generation needs).

    Args:
        image_processor ([`SparseMoEVLMImageProcessor`]): the image processor.
        tokenizer ([`PreTrainedTokenizerBase`]): any tokenizer; `<image>` is added to it if missing.
        chat_template (`str`, *optional*): Jinja chat template; defaults to this package's template.
        image_token (`str`, *optional*, defaults to `"<image>"`): the image placeholder.
        image_seq_length (`int`, *optional*, defaults to 196): image tokens per image
            (`config.image_seq_length`).
        max_position_embeddings (`int`, *optional*): the model's context length; longer prompts (after image
            expansion) raise a `ValueError`.
    """

    return_mm_token_type_ids = True

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = IMAGE_TOKEN,
        image_seq_length: int = 196,
        max_position_embeddings: int | None = None,
        **kwargs,
    ):
        if tokenizer is not None and image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if tokenizer is not None else None
        self.image_seq_length = image_seq_length
        self.max_position_embeddings = max_position_embeddings
        if chat_template is None:
            chat_template = CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.tokenizer.padding_side = "left"

    @classmethod
    def from_model_config(cls, config, tokenizer: PreTrainedTokenizerBase, **kwargs) -> "SparseMoEVLMProcessor":
        """The processor for a `SparseMoEVLMConfig` and a tokenizer (image size, normalisation, image tokens
        and context length taken from the config). Checks that the tokenizer's image token is the config's."""
        processor = cls(
            image_processor=SparseMoEVLMImageProcessor.from_model_config(config),
            tokenizer=tokenizer,
            image_seq_length=config.image_seq_length,
            max_position_embeddings=config.text_config.max_position_embeddings,
            **kwargs,
        )
        if processor.image_token_id != config.image_token_id:
            raise ValueError(
                f"The tokenizer's image token {processor.image_token!r} has id {processor.image_token_id} but "
                f"`config.image_token_id` is {config.image_token_id}: set `image_token_id={processor.image_token_id}`"
                " in the model config (or use `build_processor`, which does it)."
            )
        if len(tokenizer) > config.text_config.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but `text_config.vocab_size` is "
                f"{config.text_config.vocab_size}: raise the vocab size or resize the model's embeddings."
            )
        return processor

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        """Expand image placeholders, tokenize, process images. `text` is a string or a list of strings;
        `images` an image, a list of images, or a list (per prompt) of lists of images."""
        if text is not None and not isinstance(text, str) and not (
            isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)
        ):
            raise TypeError(f"`text` must be a string or a list of strings, got {type(text).__name__}"
                            + (f" of {type(text[0]).__name__}" if isinstance(text, (list, tuple)) and text else ""))
        if isinstance(text, (list, tuple)) and not text:
            raise ValueError("`text` is an empty list: pass at least one prompt (a string or a list of strings).")
        for index, prompt in enumerate([text] if isinstance(text, str) else text or []):
            _check_encodable(prompt, index)
        if images is not None and isinstance(images, (int, float, dict, bytes, bool)):
            raise TypeError("`images` must be a PIL image, numpy array, torch tensor or image path, or a list of "
                            f"them; got {type(images).__name__}.")
        for modality in ("videos", "audio", "audios"):
            # Harnesses (lmms-eval) pass empty lists for the modalities a request lacks; this model takes images.
            value = kwargs.pop(modality, None)
            if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 0):
                raise ValueError(f"SparseMoE-VLM takes images and text only; got `{modality}`.")
        if isinstance(images, (list, tuple)) and all(isinstance(i, (list, tuple)) and not i for i in images):
            images = None  # a text-only request given as an empty image list (per prompt, or overall)
        outputs = super().__call__(images=images, text=text, **kwargs)
        if self.max_position_embeddings is not None and "input_ids" in outputs:
            lengths = [len(ids) for ids in outputs["input_ids"]]
            if max(lengths) > self.max_position_embeddings:
                raise ValueError(
                    f"Prompt of {max(lengths)} tokens (after expanding each image to {self.image_seq_length} image "
                    f"tokens) is longer than the model's context of {self.max_position_embeddings} positions "
                    "(`max_position_embeddings`): shorten the text or pass fewer images. Prompts are not truncated, "
                    "since a cut through image tokens would break the image."
                )
        return outputs

    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], *args, **kwargs):
        """`ProcessorMixin.apply_chat_template`, refusing empty conversations: they would render to the BOS token
        alone (or fail with an `IndexError`) instead of a prompt."""
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
        for index, messages in enumerate(conversation if batched else [conversation]):
            messages = getattr(messages, "messages", messages)
            if isinstance(messages, (list, tuple)) and not messages:
                where = f"Conversation {index} of the batch" if batched else "The conversation"
                raise ValueError(
                    f"{where} has no message: pass a list of messages such as `[{{'role': 'user', 'content': "
                    "[{'type': 'image'}, {'type': 'text', 'text': '...'}]}]` (a list of such lists for a batch)."
                )
        return super().apply_chat_template(conversation, *args, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs) -> MultiModalData:
        """
        Computes the number of placeholder tokens needed for multimodal inputs with the given sizes.

        Args:
            image_sizes (`list[list[int]]`, *optional*):
                The input sizes formatted as (height, width) per each image.

        Returns:
            `MultiModalData`: A `MultiModalData` object holding number of tokens per each of the provided
            input modalities, along with other useful data.
        """
        vision_data = {}
        if image_sizes is not None:
            # Every image is resized to the tower's fixed input size, so its size never changes the count:
            # `replace_image_token` always inserts `image_seq_length` tokens, from one patch (no tiling).
            vision_data["num_image_tokens"] = [self.image_seq_length] * len(image_sizes)
            vision_data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**vision_data)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decode generated ids to text (image tokens and other special tokens skipped by default)."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values"]


def build_processor(config, texts: Iterable[str], min_frequency: int = 1) -> SparseMoEVLMProcessor:
    """Build a complete processor from scratch for a model config: a byte-level BPE tokenizer trained on `texts`
    (vocabulary size `config.text_config.vocab_size`) and the image processor matching the vision tower.

    The config's special token ids are set to the tokenizer's (`image_token_id`, and `pad_token_id`,
    `bos_token_id`, `eos_token_id` on the text config) so that a model built from it afterwards matches.
    """
    tokenizer = build_tokenizer(texts, vocab_size=config.text_config.vocab_size, min_frequency=min_frequency)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    return SparseMoEVLMProcessor.from_model_config(config, tokenizer)


__all__ = ["SparseMoEVLMProcessor", "build_processor", "build_tokenizer", "CHAT_TEMPLATE"]
