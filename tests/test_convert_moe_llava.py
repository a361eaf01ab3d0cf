"""conversion/convert_moe_llava.py on synthetic MoE-LLaVA checkpoints: tiny random tensors under exactly the key
names and shapes MoE-LLaVA (DeepSpeed-MoE) saves, its config.json fields, and a tokenizer without an image token."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration
from hf_sparsemoe_vlm.conversion.scripts import verification_inputs

from tiny_models import CORPUS, load_conversion_script


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "conversion" / "convert_moe_llava.py"

HIDDEN, INTER, LAYERS, EXPERTS, HEADS = 32, 48, 4, 4, 4
VISION = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}
TOWER = "image_tower.image_tower.vision_model."
PROJ = "mm_projector.image_spatial_proj."


cml = load_conversion_script("convert_moe_llava")


# ----------------------------------------------------------------------------------------------------------------
# Synthetic MoE-LLaVA checkpoints


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A Llama-like byte-level BPE tokenizer (<unk>, <s>, </s>; pad = unk as MoE-LLaVA sets it), no <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<unk>")
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def vision_tower_dir(tmp_path_factory):
    """A local 'CLIP model' folder (what --vision_tower points at): config + weights."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(123)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(folder)
    return folder


def _vocab(tokenizer_dir) -> int:
    return len(PreTrainedTokenizerFast.from_pretrained(tokenizer_dir))


def moe_llava_config(backbone: str, vocab: int, moe_layers, top_k: int, num_experts: int = EXPERTS) -> dict:
    """config.json as MoE-LLaVA writes it (MoELLaVA<Backbone>Config: base config + mm_* fields + the `moe` dict)."""
    multimodal = {
        "mm_image_tower": "openai/clip-vit-large-patch14-336", "mm_video_tower": None, "mm_hidden_size": 24,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_projector_type": "mlp2x_gelu",
        "video_projector_type": "linear", "video_global_proj": False, "video_temproal_proj": False,
        "video_spatial_proj": False, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad", "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False, "mm_projector_lr": None, "use_mm_proj": True,
        "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": list(moe_layers), "ep_size": 1,
                "top_k_experts": top_k, "capacity_factor": 1.5, "eval_capacity_factor": 2.0, "min_capacity": 0,
                "use_residual": False, "router_aux_loss_coef": 0.01,
                "train_modules": ["up_proj", "down_proj", "gate_proj", "wg"],
                "num_experts": [num_experts] * len(moe_layers)},
        "torch_dtype": "float32", "transformers_version": "4.37.0", "use_cache": True,
    }
    if backbone == "qwen":
        base = {"architectures": ["MoELLaVAQWenForCausalLM"], "model_type": "moe_llava_qwen", "vocab_size": vocab,
                "hidden_size": HIDDEN, "intermediate_size": 2 * INTER, "num_hidden_layers": LAYERS,
                "num_attention_heads": HEADS, "kv_channels": HIDDEN // HEADS, "layer_norm_epsilon": 1e-6,
                "max_position_embeddings": 8192, "seq_length": 256, "rotary_pct": 1.0, "rotary_emb_base": 10000,
                "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True, "tie_word_embeddings": False,
                "emb_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "scale_attn_weights": True, "bf16": False,
                "fp16": False, "fp32": False, "use_flash_attn": "auto", "initializer_range": 0.02}
    else:
        model_type = {"llama": "moe_llava_llama", "mistral": "moe_llava_mistral", "qwen1_5": "moe_llava_qwen1_5"}
        arch = {"llama": "Llama", "mistral": "Mistral", "qwen1_5": "Qwen1_5"}[backbone]
        base = {"architectures": [f"MoELLaVA{arch}ForCausalLM"], "model_type": model_type[backbone],
                "vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
                "num_attention_heads": HEADS, "num_key_value_heads": 2 if backbone != "qwen1_5" else HEADS,
                "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "rope_scaling": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 0, "initializer_range": 0.02}
        if backbone == "llama":
            base.update(attention_bias=False, pretraining_tp=1)
        if backbone == "mistral":
            base.update(sliding_window=128)
        if backbone == "qwen1_5":
            base.update(use_sliding_window=False, sliding_window=4096, max_window_layers=28)
    return {**base, **multimodal}


def moe_llava_state_dict(backbone: str, vocab: int, moe_layers, num_experts: int = EXPERTS, with_tower: bool = True,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under MoE-LLaVA's exact key names and shapes."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    root = "transformer." if backbone == "qwen" else "model."
    state = {}
    if with_tower:
        torch.manual_seed(seed)
        tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).state_dict()
        # Transformers 4.37 (MoE-LLaVA's pin) nests CLIPVisionModel's weights under `vision_model.`.
        state.update({root + TOWER + k.removeprefix("vision_model."): rand(*v.shape) for k, v in tower.items()})
    state.update({root + PROJ + "0.weight": rand(HIDDEN, 24), root + PROJ + "0.bias": rand(HIDDEN),
                  root + PROJ + "2.weight": rand(HIDDEN, HIDDEN), root + PROJ + "2.bias": rand(HIDDEN)})
    head_dim = HIDDEN // HEADS
    if backbone == "qwen":
        state["transformer.wte.weight"] = rand(vocab, HIDDEN)
        state["transformer.ln_f.weight"] = 1 + rand(HIDDEN)
        for i in range(LAYERS):
            p = f"transformer.h.{i}."
            state.update({p + "ln_1.weight": 1 + rand(HIDDEN), p + "ln_2.weight": 1 + rand(HIDDEN),
                          p + "attn.c_attn.weight": rand(3 * HIDDEN, HIDDEN), p + "attn.c_attn.bias": rand(3 * HIDDEN),
                          p + "attn.c_proj.weight": rand(HIDDEN, HIDDEN)})
            mlps = [p + f"mlp.deepspeed_moe.experts.deepspeed_experts.{e}." for e in range(num_experts)] \
                if i in moe_layers else [p + "mlp."]
            for m in mlps:
                state.update({m + "w1.weight": rand(INTER, HIDDEN), m + "w2.weight": rand(INTER, HIDDEN),
                              m + "c_proj.weight": rand(HIDDEN, INTER)})
            if i in moe_layers:
                state[p + "mlp.deepspeed_moe.gate.wg.weight"] = rand(num_experts, HIDDEN)
    else:
        kv = 2 if backbone != "qwen1_5" else HEADS
        state["model.embed_tokens.weight"] = rand(vocab, HIDDEN)
        state["model.norm.weight"] = 1 + rand(HIDDEN)
        for i in range(LAYERS):
            p = f"model.layers.{i}."
            state.update({p + "input_layernorm.weight": 1 + rand(HIDDEN),
                          p + "post_attention_layernorm.weight": 1 + rand(HIDDEN),
                          p + "self_attn.q_proj.weight": rand(HEADS * head_dim, HIDDEN),
                          p + "self_attn.k_proj.weight": rand(kv * head_dim, HIDDEN),
                          p + "self_attn.v_proj.weight": rand(kv * head_dim, HIDDEN),
                          p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * head_dim)})
            if backbone == "qwen1_5":
                state.update({p + f"self_attn.{n}_proj.bias": rand(HEADS * head_dim) for n in "qkv"})
            mlps = [p + f"mlp.deepspeed_moe.experts.deepspeed_experts.{e}." for e in range(num_experts)] \
                if i in moe_layers else [p + "mlp."]
            for m in mlps:
                state.update({m + "gate_proj.weight": rand(INTER, HIDDEN), m + "up_proj.weight": rand(INTER, HIDDEN),
                              m + "down_proj.weight": rand(HIDDEN, INTER)})
            if i in moe_layers:
                state[p + "mlp.deepspeed_moe.gate.wg.weight"] = rand(num_experts, HIDDEN)
    state["lm_head.weight"] = rand(vocab, HIDDEN)
    return state


def make_checkpoint(folder: Path, tokenizer_dir: Path, backbone: str = "llama", moe_layers=(0, 2), top_k: int = 2,
                    extra_rows: int = 0, with_tower: bool = True, edit=None, fmt: str = "safetensors",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a MoE-LLaVA checkpoint folder; `edit(state, config)` may change it first. Returns the state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(tokenizer_dir) + extra_rows
    state = moe_llava_state_dict(backbone, vocab, list(moe_layers), with_tower=with_tower, seed=seed)
    config = moe_llava_config(backbone, vocab, moe_layers, top_k)
    if edit is not None:
        edit(state, config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in os.listdir(tokenizer_dir):
        (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    else:  # what MoE-LLaVA's train.py writes for MoE runs: torch.save(model.state_dict())
        torch.save(state, folder / "pytorch_model.bin")
    return state


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("moe_llava_llama")
    state = make_checkpoint(folder, tokenizer_dir, "llama")
    return folder, state


def run_convert(input_dir, output_dir=None, vision_tower=None, **kwargs):
    return cml.convert(input_dir, output_dir, vision_tower=vision_tower, quiet=True, **kwargs)


def cli_error(argv: list[str], capsys) -> str:
    """Run the script's `main(argv)`: it must fail with exit status 1; returns the `error: ...` it printed."""
    assert cml.main(argv) == 1
    return capsys.readouterr().err.strip()


def _tower_prefix(model) -> str:
    keys = model.state_dict()
    return "model.vision_tower.vision_model." if any(k.startswith("model.vision_tower.vision_model.") for k in keys) \
        else "model.vision_tower."


# ----------------------------------------------------------------------------------------------------------------
# CLI contract


def test_help_lists_the_options_and_documents_the_image_token(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cml.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--input", "--output", "--overwrite", "--max_shard_size", "--per_expert_layout", "--vision_tower",
                   "--image_token"):
        assert option in text
    assert "-200" in text and "mean embedding" in text


def test_cli_subprocess_converts_and_refuses_non_empty_output(llama_checkpoint, vision_tower_dir, tmp_path, capsys):
    input_dir, _ = llama_checkpoint
    output = tmp_path / "converted"
    command = [sys.executable, str(SCRIPT), "--input", str(input_dir), "--output", str(output),
               "--vision_tower", str(vision_tower_dir), "--max_shard_size", "50KB",
               "--base_model", "LanguageBind/MoE-LLaVA-Tiny-4e"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("source", "backbone", "experts", "MoE layers", "total parameters"):
        assert row in done.stdout
    # The summary comes once the written checkpoint has been re-loaded and checked.
    assert re.search(r"written checkpoint\s+" + re.escape(str(output.resolve())) + r" \(re-loaded: weights identical, "
                     r"logits within 1e-5\)", done.stdout)
    files = {p.name for p in output.iterdir()}
    assert {"config.json", "README.md", "conversion.json", "tokenizer.json", "processor_config.json"} <= files
    assert any(name.startswith("model-") and name.endswith(".safetensors") for name in files)  # sharded at 50KB
    info = json.loads((output / "conversion.json").read_text())
    assert info["method"] == "moe-llava import" and info["backbone"] == "llama"
    assert info["base_model"] == "LanguageBind/MoE-LLaVA-Tiny-4e"
    card = (output / "README.md").read_text()
    assert "LanguageBind/MoE-LLaVA-Tiny-4e" in card and "converted from MoE-LLaVA" in card

    # A second run into the now non-empty folder, without --overwrite: non-zero exit, folder untouched.
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    message = cli_error(command[2:], capsys)
    assert message.startswith("error:") and "not empty" in message
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no staging folder left behind


# ----------------------------------------------------------------------------------------------------------------
# Mapping


def test_every_source_tensor_lands_at_its_key(llama_checkpoint, vision_tower_dir, tokenizer_dir):
    input_dir, source = llama_checkpoint
    result = run_convert(input_dir, vision_tower=vision_tower_dir)
    model, config = result.model, result.model.config
    target = model.state_dict()
    vocab = _vocab(tokenizer_dir)

    # Config: one pool, top-2 renormalised, MoE-LLaVA's layers, vision settings, the new image token.
    text = config.text_config
    assert text.num_experts == EXPERTS and text.num_image_experts == 0 and text.num_shared_experts == 0
    assert text.router_type == "topk" and text.num_experts_per_tok == 2 and text.norm_topk_prob
    assert text.mlp_layer_types == ["sparse", "dense", "sparse", "dense"]
    assert text.moe_intermediate_size == INTER and text.router_aux_loss_coef == 0.01
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.image_seq_length == 16 and config.vision_config.model_type == "clip_vision_model"
    assert text.vocab_size == vocab + 1 and config.image_token_id == vocab
    assert result.processor.tokenizer.convert_tokens_to_ids("<image>") == vocab
    assert result.processor.image_seq_length == 16 and result.processor.image_token_id == vocab

    def same(target_key, source_key):
        assert torch.equal(target[target_key], source[source_key]), (target_key, source_key)

    tower = _tower_prefix(model)
    for key in (k for k in source if k.startswith("model." + TOWER)):
        same(tower + key.removeprefix("model." + TOWER), key)
    same("model.multi_modal_projector.linear_1.weight", f"model.{PROJ}0.weight")
    same("model.multi_modal_projector.linear_1.bias", f"model.{PROJ}0.bias")
    same("model.multi_modal_projector.linear_2.weight", f"model.{PROJ}2.weight")
    same("model.multi_modal_projector.linear_2.bias", f"model.{PROJ}2.bias")
    lm = "model.language_model."
    embed = target[lm + "embed_tokens.weight"]
    assert torch.equal(embed[:vocab], source["model.embed_tokens.weight"])
    # resize_token_embeddings(mean_resizing=True): sampled from N(mean, 1e-9 * covariance), so within ~1e-4 of it.
    torch.testing.assert_close(embed[vocab], source["model.embed_tokens.weight"].mean(0), atol=1e-4, rtol=0)
    assert torch.equal(target["lm_head.weight"][:vocab], source["lm_head.weight"])
    torch.testing.assert_close(target["lm_head.weight"][vocab], source["lm_head.weight"].mean(0), atol=1e-4, rtol=0)
    same(lm + "norm.weight", "model.norm.weight")
    for i in range(LAYERS):
        p, s = f"{lm}layers.{i}.", f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj"):
            same(p + name + ".weight", s + name + ".weight")
        if i in (0, 2):
            same(p + "mlp.text_moe.router.weight", s + "mlp.deepspeed_moe.gate.wg.weight")
            gate_up, down = target[p + "mlp.text_moe.experts.gate_up_proj"], target[p + "mlp.text_moe.experts.down_proj"]
            assert gate_up.shape == (EXPERTS, 2 * INTER, HIDDEN) and down.shape == (EXPERTS, HIDDEN, INTER)
            for e in range(EXPERTS):
                expert = f"{s}mlp.deepspeed_moe.experts.deepspeed_experts.{e}."
                assert torch.equal(gate_up[e, :INTER], source[expert + "gate_proj.weight"])
                assert torch.equal(gate_up[e, INTER:], source[expert + "up_proj.weight"])
                assert torch.equal(down[e], source[expert + "down_proj.weight"])
            assert not any(k.startswith(p + "mlp.image_moe") or k.startswith(p + "mlp.gate_proj") for k in target)
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                same(f"{p}mlp.{name}.weight", f"{s}mlp.{name}.weight")
    # Every source tensor is accounted for, and every target tensor comes from the checkpoint.
    used = {key for sources in result.key_map.values() for key in sources}
    assert used == set(source)
    assert set(result.key_map) == set(target)


def _deepspeed_moe_reference(x, wg, experts, k):
    """One MoE-LLaVA MoE layer at inference as DeepSpeed computes it (fp32 gate; top1gating weighs the expert by
    its softmax probability, top2gating renormalises over the two chosen experts), without capacity drops and with
    the 2nd expert taken deterministically (DeepSpeed samples it with Gumbel noise)."""
    logits = x.float() @ wg.float().t()
    gates = logits.softmax(dim=-1)
    mask1 = F.one_hot(gates.argmax(dim=-1), gates.shape[-1]).float()
    if k == 1:
        weights = gates * mask1
    else:
        mask2 = F.one_hot(logits.masked_fill(mask1.bool(), float("-inf")).argmax(dim=-1), gates.shape[-1]).float()
        g1, g2 = (gates * mask1).sum(-1), (gates * mask2).sum(-1)
        denom = (g1 + g2).clamp(min=torch.finfo(gates.dtype).eps)
        weights = (g1 / denom)[:, None] * mask1 + (g2 / denom)[:, None] * mask2
    out = torch.zeros_like(x)
    for e, (gate, up, down) in enumerate(experts):
        out += weights[:, e : e + 1] * (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_converted_moe_layer_matches_deepspeed_reference(top_k, tmp_path, tokenizer_dir, vision_tower_dir):
    input_dir = tmp_path / f"top{top_k}"
    source = make_checkpoint(input_dir, tokenizer_dir, "llama", top_k=top_k, seed=top_k)
    model = run_convert(input_dir, vision_tower=vision_tower_dir).model
    assert model.config.text_config.norm_topk_prob == (top_k > 1)
    hidden = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(7))
    for layer in (0, 2):
        s = f"model.layers.{layer}.mlp.deepspeed_moe."
        experts = [tuple(source[f"{s}experts.deepspeed_experts.{e}.{n}_proj.weight"] for n in ("gate", "up", "down"))
                   for e in range(EXPERTS)]
        expected = _deepspeed_moe_reference(hidden, source[s + "gate.wg.weight"], experts, top_k)
        with torch.no_grad():
            actual, _ = model.model.language_model.layers[layer].mlp(hidden[None])  # (output, router logits)
            actual = actual[0]
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_shard_size", ["5GB", "50KB"])
def test_per_expert_layout_reloads_to_identical_logits(max_shard_size, llama_checkpoint, vision_tower_dir, tmp_path):
    from safetensors import safe_open

    input_dir, _ = llama_checkpoint
    fused = run_convert(input_dir, tmp_path / "fused", vision_tower=vision_tower_dir).output_dir
    split = run_convert(input_dir, tmp_path / "split", vision_tower=vision_tower_dir, per_expert_layout=True,
                        max_shard_size=max_shard_size).output_dir
    keys, files = set(), sorted(split.glob("*.safetensors"))
    for path in files:
        with safe_open(path, "pt") as f:
            keys |= set(f.keys())
    assert (len(files) > 1) == (max_shard_size == "50KB")
    assert "model.language_model.layers.0.mlp.text_moe.experts.3.gate_proj.weight" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    a = SparseMoEVLMForConditionalGeneration.from_pretrained(fused).eval()
    b = SparseMoEVLMForConditionalGeneration.from_pretrained(split).eval()
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    inputs = verification_inputs(a.config)
    with torch.no_grad():
        # Weights memory-mapped from safetensors sit at 8-byte-aligned file offsets, which can send CPU matmuls down
        # other kernels (~1e-6 apart); in fresh memory both layouts give bit-identical logits.
        for model in (a, b):
            for parameter in model.parameters():
                parameter.data = parameter.data.clone()
        assert torch.equal(a(**inputs).logits, b(**inputs).logits)


def test_pytorch_bin_checkpoint_and_tower_from_vision_tower_folder(tmp_path, tokenizer_dir, vision_tower_dir):
    """MoE-LLaVA's train.py writes pytorch_model.bin; a checkpoint without tower tensors takes them from
    --vision_tower (and cannot be converted without it)."""
    input_dir = tmp_path / "no_tower"
    make_checkpoint(input_dir, tokenizer_dir, "mistral", with_tower=False, fmt="bin")
    with pytest.raises(cml.ConversionError, match="--vision_tower"):
        run_convert(input_dir)
    result = run_convert(input_dir, vision_tower=vision_tower_dir)
    tower = CLIPVisionModel.from_pretrained(vision_tower_dir).state_dict()
    target = result.model.state_dict()
    prefix = "model.vision_tower."
    for key, value in tower.items():
        assert torch.equal(target[prefix + key], value)
    # Mistral's sliding window (128 < 256 positions) limits the context, where full attention is identical.
    assert result.model.config.text_config.max_position_embeddings == 128


def test_qwen_backbone_splits_c_attn_and_maps_w2_to_gate(tmp_path, tokenizer_dir, vision_tower_dir):
    input_dir = tmp_path / "qwen"
    source = make_checkpoint(input_dir, tokenizer_dir, "qwen", moe_layers=(1, 3), extra_rows=5)
    result = run_convert(input_dir, vision_tower=vision_tower_dir)
    model, target = result.model, result.model.state_dict()
    text = model.config.text_config
    vocab = _vocab(tokenizer_dir)
    assert text.attention_bias and text.mlp_layer_types == ["dense", "sparse", "dense", "sparse"]
    assert text.max_position_embeddings == 256  # Qwen's seq_length
    # Padded vocabulary: <image> takes the first spare row, no resize.
    assert text.vocab_size == vocab + 5 and model.config.image_token_id == vocab
    assert torch.allclose(target["model.language_model.embed_tokens.weight"][vocab],
                          source["transformer.wte.weight"][:vocab].mean(0))
    lm = "model.language_model.layers."
    for i in range(LAYERS):
        qkv_w, qkv_b = source[f"transformer.h.{i}.attn.c_attn.weight"], source[f"transformer.h.{i}.attn.c_attn.bias"]
        for part, name in enumerate("qkv"):
            assert torch.equal(target[f"{lm}{i}.self_attn.{name}_proj.weight"], qkv_w[part * HIDDEN:(part + 1) * HIDDEN])
            assert torch.equal(target[f"{lm}{i}.self_attn.{name}_proj.bias"], qkv_b[part * HIDDEN:(part + 1) * HIDDEN])
        assert torch.equal(target[f"{lm}{i}.self_attn.o_proj.weight"], source[f"transformer.h.{i}.attn.c_proj.weight"])
        assert not target[f"{lm}{i}.self_attn.o_proj.bias"].any()
    # QWenMLP computes c_proj(w1(x) * silu(w2(x))): w2 is the gate.
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    s = "transformer.h.0.mlp."
    expected = (x @ source[s + "w1.weight"].t() * F.silu(x @ source[s + "w2.weight"].t())) @ source[s + "c_proj.weight"].t()
    with torch.no_grad():
        torch.testing.assert_close(model.model.language_model.layers[0].mlp(x), expected, atol=1e-5, rtol=1e-5)
    gate_up = target[f"{lm}1.mlp.text_moe.experts.gate_up_proj"]
    expert = "transformer.h.1.mlp.deepspeed_moe.experts.deepspeed_experts.2."
    assert torch.equal(gate_up[2], torch.cat([source[expert + "w2.weight"], source[expert + "w1.weight"]]))
    assert {k for v in result.key_map.values() for k in v} == set(source)


# ----------------------------------------------------------------------------------------------------------------
# Rejections: nothing is written


def _assert_nothing_written(output: Path):
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]


@pytest.mark.parametrize("model_type, reason", [
    ("moe_llava_stablelm", "LayerNorm"),
    ("moe_llava_phi", "Phi-2"),
    ("moe_llava_minicpm", "MiniCPM"),
])
def test_unsupported_backbone_exits_before_writing(model_type, reason, llama_checkpoint, tmp_path, capsys):
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    config = json.loads((llama_checkpoint[0] / "config.json").read_text())
    config.update(model_type=model_type, architectures=[f"EvalMoELLaVA{model_type[10:].capitalize()}ForCausalLM"])
    (input_dir / "config.json").write_text(json.dumps(config))
    output = tmp_path / "out"
    message = cli_error(["--input", str(input_dir), "--output", str(output)], capsys)
    assert message.startswith("error:") and model_type in message and reason in message
    _assert_nothing_written(output)


@pytest.mark.parametrize("change, match", [
    (lambda c: c["moe"].update(use_residual=True), "Residual-MoE"),
    (lambda c: c.update(image_projector_type="linear"), "Projector type 'linear'"),
    (lambda c: c.update(model_type="llava_llama"), "dense"),
])
def test_unsupported_settings_are_rejected(change, match, llama_checkpoint, tmp_path):
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    config = json.loads((llama_checkpoint[0] / "config.json").read_text())
    change(config)
    (input_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(cml.ConversionError, match=match):
        run_convert(input_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_unknown_key_is_an_error(tmp_path, tokenizer_dir, vision_tower_dir, capsys):
    input_dir = tmp_path / "extra"
    make_checkpoint(input_dir, tokenizer_dir, edit=lambda state, config: state.update(
        {"model.layers.1.mlp.deepspeed_moe.gate.wg.weight": torch.zeros(EXPERTS, HIDDEN),
         "model.some_new_module.weight": torch.zeros(3)}))
    with pytest.raises(cml.ConversionError) as error:
        run_convert(input_dir, tmp_path / "out", vision_tower=vision_tower_dir)
    assert "Layer 1 has DeepSpeed-MoE tensors" in str(error.value)
    _assert_nothing_written(tmp_path / "out")

    input_dir = tmp_path / "extra2"
    make_checkpoint(input_dir, tokenizer_dir, edit=lambda state, config: state.update(
        {"model.some_new_module.weight": torch.zeros(3)}))
    message = cli_error(["--input", str(input_dir), "--output", str(tmp_path / "out"), "--vision_tower",
                         str(vision_tower_dir)], capsys)
    assert "not used by the conversion" in message
    assert "model.some_new_module.weight" in message
    _assert_nothing_written(tmp_path / "out")


def _expert(layer: int, e: int, name: str) -> str:
    return f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{name}.weight"


@pytest.mark.parametrize("edit, match", [
    (lambda s, c: s.update({_expert(2, 1, "up_proj"): torch.zeros(INTER + 1, HIDDEN)}),
     r"deepspeed_experts\.1\.up_proj\.weight has shape \(49, 32\), expected \(48, 32\)"),
    (lambda s, c: [s.pop(_expert(0, 3, n)) for n in ("gate_proj", "up_proj", "down_proj")],
     r"Layer 0 has experts \[0, 1, 2\] but moe.num_experts is 4"),
    (lambda s, c: s.update({"model.layers.2.mlp.deepspeed_moe.gate.wg.weight": torch.zeros(EXPERTS, HIDDEN + 1)}),
     r"gate\.wg\.weight has shape \(4, 33\)"),
    (lambda s, c: c.update(hidden_size=48), r"has shape .* expected"),
])
def test_shape_mismatches_exit_non_zero(edit, match, tmp_path, tokenizer_dir, vision_tower_dir, capsys):
    input_dir = tmp_path / "bad"
    make_checkpoint(input_dir, tokenizer_dir, edit=edit)
    message = cli_error(["--input", str(input_dir), "--output", str(tmp_path / "out"), "--vision_tower",
                         str(vision_tower_dir)], capsys)
    assert message.startswith("error:")
    assert re.search(match, message), message
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("fmt, weights", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_truncated_weight_file_is_named_and_left_alone(fmt, weights, tmp_path, tokenizer_dir, vision_tower_dir, capsys):
    input_dir = tmp_path / "truncated"
    make_checkpoint(input_dir, tokenizer_dir, fmt=fmt)
    path = input_dir / weights
    path.write_bytes(path.read_bytes()[:4000])  # an interrupted download
    before = path.read_bytes()
    message = cli_error(["--input", str(input_dir), "--output", str(tmp_path / "out"), "--vision_tower",
                         str(vision_tower_dir)], capsys)
    assert message.startswith(f"error: Could not read the weight file {path}") and "Re-download it" in message
    assert path.read_bytes() == before
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("output", ["input", "input/converted", "tower"])
def test_output_over_the_source_or_the_tower_is_refused_even_with_overwrite(output, llama_checkpoint,
                                                                             vision_tower_dir, capsys):
    input_dir, _ = llama_checkpoint
    folder = {"input": input_dir, "input/converted": input_dir / "converted", "tower": vision_tower_dir}[output]
    before = {p: p.read_bytes() for p in [*input_dir.rglob("*"), *vision_tower_dir.rglob("*")] if p.is_file()}
    message = cli_error(["--input", str(input_dir), "--output", str(folder), "--vision_tower", str(vision_tower_dir),
                         "--overwrite"], capsys)
    assert "would overwrite the checkpoint being converted" in message
    assert {p: p.read_bytes() for p in [*input_dir.rglob("*"), *vision_tower_dir.rglob("*")] if p.is_file()} == before


@pytest.mark.parametrize("backbone", ["llama", "qwen"])
def test_the_mapping_is_data_that_runs_both_ways(backbone, tmp_path, tokenizer_dir, vision_tower_dir):
    """The key mapping is Transformers conversion rules: renamings, Qwen-1's c_attn split (Chunk) and, last, the
    expert-fusing rules the model registers (MergeModulelist + Concatenate, what from_pretrained runs on a
    per-expert checkpoint). Run backwards over the converted model's parameters they name exactly MoE-LLaVA's
    tensors at their shapes."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, WeightConverter, WeightRenaming

    input_dir = tmp_path / backbone
    source = make_checkpoint(input_dir, tokenizer_dir, backbone, moe_layers=(1, 3))
    model = run_convert(input_dir, vision_tower=vision_tower_dir).model
    mapping = cml.moe_llava_weight_mapping(backbone, _tower_prefix(model))
    registered = get_checkpoint_conversion_mapping("sparsemoe_vlm")
    assert all(type(rule) in (WeightRenaming, WeightConverter) for rule in mapping)
    assert [[type(op) for op in rule.operations] for rule in mapping[-len(registered):]] == \
        [[MergeModulelist, Concatenate], [MergeModulelist]]
    splits = [rule for rule in mapping[:-len(registered)] if isinstance(rule, WeightConverter)]
    assert [[type(op) for op in rule.operations] for rule in splits] == \
        ([[Chunk], [Chunk]] if backbone == "qwen" else [])

    config = model.config
    config.text_config.vocab_size -= 1  # the checkpoint's vocabulary, before the image token
    expected = cml.expected_checkpoint(config, mapping)
    assert {key: expected[key] for key in source} == {key: tuple(value.shape) for key, value in source.items()}
    # The one extra: QWen's c_proj has no bias (no_bias=True); the converted o_proj bias starts at zero.
    assert set(expected) - set(source) == ({f"transformer.h.{i}.attn.c_proj.bias" for i in range(LAYERS)}
                                           if backbone == "qwen" else set())


def test_sharded_qwen1_5_checkpoint_with_layers_from_moe_mode(tmp_path, tokenizer_dir, vision_tower_dir):
    """A sharded `moe_llava_qwen1_5` checkpoint (Qwen2 decoder: q/k/v biases) whose config leaves `moe_layers_idx`
    empty: the MoE layers come from MoE-LLaVA's `moe_mode` rule (`sparse` = 0, 2, ...), every tensor of every shard
    is mapped, and the MoE layers compute what DeepSpeed-MoE computes."""
    from safetensors.torch import load_file

    input_dir = tmp_path / "qwen1_5"

    def resolve_layers_from_mode(state, config):
        config["moe"].update(moe_layers_idx=None, moe_mode="sparse")

    source = make_checkpoint(input_dir, tokenizer_dir, "qwen1_5", moe_layers=(0, 2), edit=resolve_layers_from_mode)
    single = input_dir / "model.safetensors"
    state, weight_map = load_file(single), {}
    single.unlink()
    keys = sorted(state)
    for shard, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file({k: state[k].contiguous() for k in part}, input_dir / name)
        weight_map.update(dict.fromkeys(part, name))
    (input_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    result = run_convert(input_dir, vision_tower=vision_tower_dir)
    model = result.model
    assert model.config.text_config.mlp_layer_types == ["sparse", "dense", "sparse", "dense"]
    assert sorted(k for sources in result.key_map.values() for k in sources) == sorted(source)
    converted = model.state_dict()
    for n in "qkv":
        torch.testing.assert_close(converted[f"model.language_model.layers.1.self_attn.{n}_proj.bias"],
                                   source[f"model.layers.1.self_attn.{n}_proj.bias"], atol=0, rtol=0)
    hidden = torch.randn(32, HIDDEN, generator=torch.Generator().manual_seed(3))
    for layer in (0, 2):
        s = f"model.layers.{layer}.mlp.deepspeed_moe."
        experts = [tuple(source[f"{s}experts.deepspeed_experts.{e}.{n}_proj.weight"] for n in ("gate", "up", "down"))
                   for e in range(EXPERTS)]
        expected = _deepspeed_moe_reference(hidden, source[s + "gate.wg.weight"], experts, 2)
        with torch.no_grad():
            actual, _ = model.model.language_model.layers[layer].mlp(hidden[None])  # (output, router logits)
            actual = actual[0]
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)

    # A shard the index lists but the folder lacks is named before anything is converted.
    (input_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(cml.ConversionError, match=r"lists shards that are missing: \['model-00002-of-00002"):
        run_convert(input_dir, vision_tower=vision_tower_dir)


class _DeepSpeedMoEReference(torch.nn.Module):
    """MoE-LLaVA's `layers[i].mlp` (a DeepSpeed `MoE`) at inference, computed by `_deepspeed_moe_reference`."""

    def __init__(self, source: dict[str, torch.Tensor], prefix: str, top_k: int):
        super().__init__()
        self.wg = source[prefix + "gate.wg.weight"]
        self.experts = [tuple(source[f"{prefix}experts.deepspeed_experts.{e}.{n}_proj.weight"]
                              for n in ("gate", "up", "down")) for e in range(EXPERTS)]
        self.top_k = top_k

    def forward(self, hidden_states):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        return _deepspeed_moe_reference(flat, self.wg, self.experts, self.top_k).reshape(hidden_states.shape)


def test_converted_model_computes_what_moe_llava_computes_end_to_end(llama_checkpoint, vision_tower_dir):
    """MoE-LLaVA's forward rebuilt from its parts (CLIP `hidden_states[-2]` patch features -> mlp2x_gelu projector ->
    spliced at the image placeholder -> Llama decoder whose MoE layers are DeepSpeed-MoE) against the converted
    model on the same prompt, image included: every tensor is not only at its key but means the same thing there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    input_dir, source = llama_checkpoint
    config = json.loads((input_dir / "config.json").read_text())
    model = run_convert(input_dir, vision_tower=vision_tower_dir).model.eval()
    vocab = config["vocab_size"]

    tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    tower.load_state_dict({k.removeprefix("model." + TOWER): v for k, v in source.items()
                           if k.startswith("model." + TOWER)})
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False)).eval()
    for layer in config["moe"]["moe_layers_idx"]:
        llama.model.layers[layer].mlp = _DeepSpeedMoEReference(source, f"model.layers.{layer}.mlp.deepspeed_moe.",
                                                               config["moe"]["top_k_experts"])
    llama.load_state_dict({k: v for k, v in source.items()
                           if not k.startswith(("model." + TOWER, "model." + PROJ)) and ".deepspeed_moe." not in k})

    generator = torch.Generator().manual_seed(5)
    before, after = torch.randint(3, vocab, (1, 5), generator=generator), torch.randint(3, vocab, (1, 4),
                                                                                        generator=generator)
    pixel_values = torch.randn(1, 3, VISION["image_size"], VISION["image_size"], generator=generator)
    with torch.no_grad():
        patches = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]  # 'patch': no CLS
        proj = "model." + PROJ
        image = F.linear(F.gelu(F.linear(patches, source[proj + "0.weight"], source[proj + "0.bias"])),
                         source[proj + "2.weight"], source[proj + "2.bias"])
        embed = llama.get_input_embeddings()
        expected = llama(inputs_embeds=torch.cat([embed(before), image, embed(after)], dim=1)).logits
        image_ids = torch.full((1, image.shape[1]), model.config.image_token_id)
        actual = model(input_ids=torch.cat([before, image_ids, after], dim=1), pixel_values=pixel_values).logits
    assert image.shape[1] == model.config.image_seq_length
    assert actual.shape[-1] == vocab + 1  # the <image> row MoE-LLaVA's -200 placeholder never had
    torch.testing.assert_close(actual[..., :vocab], expected, atol=1e-5, rtol=1e-5)
