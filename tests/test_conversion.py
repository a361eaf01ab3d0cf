"""conversion/upcycle_llava.py and conversion/compose.py on tiny random LLaVA models and parts built from config."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import (
    AutoModelForCausalLM,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration, SparseMoEVLMProcessor, build_tokenizer
from hf_sparsemoe_vlm.conversion.scripts import (
    check_output_dir,
    logits_tolerance,
    verification_inputs,
    write_converted_checkpoint,
)
from hf_sparsemoe_vlm.conversion.upcycling import parse_layer_selection, sparse_text_config_from_dense, upcycle_llava

from tiny_models import CORPUS, load_conversion_script


ROOT = Path(__file__).resolve().parents[1]
ROUTER_TYPES = ["topk", "top_p", "relu"]
TEXT_CONFIG = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
VISION_CONFIGS = {
    "clip": {"model_type": "clip_vision_model", "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "siglip": {"model_type": "siglip_vision_model", "hidden_size": 24, "intermediate_size": 48,
               "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
}


def tiny_llava(text: str = "llama", vision: str = "clip", seed: int = 0) -> LlavaForConditionalGeneration:
    tokenizer = build_tokenizer(CORPUS, vocab_size=TEXT_CONFIG["vocab_size"])
    config = LlavaConfig(
        text_config={"model_type": text, **TEXT_CONFIG, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        vision_config=VISION_CONFIGS[vision], image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16, vision_feature_layer=-2,
        vision_feature_select_strategy="default" if vision == "clip" else "full",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def save_llava(folder: Path, text: str = "llama", vision: str = "clip") -> LlavaForConditionalGeneration:
    llava = tiny_llava(text, vision)
    llava.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                            image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28])
    tokenizer = build_tokenizer(CORPUS, vocab_size=TEXT_CONFIG["vocab_size"])
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
                   num_additional_image_tokens=1 if vision == "clip" else 0).save_pretrained(folder)
    return llava


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_layer_selection():
    assert parse_layer_selection("all", 4) == [0, 1, 2, 3]
    assert parse_layer_selection("every_other", 5) == [1, 3]
    assert parse_layer_selection("every_other_even", 5) == [0, 2, 4]
    assert parse_layer_selection("0,-1", 4) == [0, 3]
    for bad in ("7", "x,y", ""):
        with pytest.raises(ValueError, match="Layer selection"):
            parse_layer_selection(bad, 4)


@pytest.mark.parametrize("text,vision", [("llama", "clip"), ("qwen2", "siglip"), ("mistral", "clip"),
                                         ("qwen2", "clip"), ("llama", "siglip")])
@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_upcycled_llava_reproduces_the_dense_model(text, vision, router_type):
    llava = tiny_llava(text, vision)
    shared = 1 if router_type == "topk" else 0  # shared experts take a share of the MLP: still exact
    model = upcycle_llava(llava, sparse_layers="all", router_type=router_type, num_shared_experts=shared)
    inputs = verification_inputs(model.config)
    difference = (logits(model, inputs) - logits(llava, inputs)).abs().max().item()
    assert difference < 1e-5
    greedy = {"max_new_tokens": 6, "do_sample": False, "suppress_tokens": [model.config.image_token_id]}
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **greedy), llava.generate(**inputs, **greedy))


def test_upcycling_copies_weights_and_routes_every_token():
    llava = tiny_llava()
    model = upcycle_llava(llava, sparse_layers=[0, 2], num_experts=3, num_image_experts=2, noise_std=0.01, seed=1)
    text_config = model.config.text_config
    assert text_config.mlp_layer_types == ["sparse", "dense", "sparse"] and text_config.moe_intermediate_size == 48
    source = llava.state_dict()
    target = model.state_dict()
    for key in ("model.vision_tower.embeddings.patch_embedding.weight",
                "model.multi_modal_projector.linear_2.weight", "model.language_model.embed_tokens.weight",
                "model.language_model.layers.2.self_attn.k_proj.weight", "model.language_model.norm.weight",
                "model.language_model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert torch.equal(target[key], source[key]), key
    gate = source["model.language_model.layers.2.mlp.gate_proj.weight"]
    experts = target["model.language_model.layers.2.mlp.image_moe.experts.gate_up_proj"]
    assert experts.shape == (2, 96, 32)
    # Noise makes the copies differ from each other but stay close to the MLP (relative std 0.01).
    assert not torch.equal(experts[0], experts[1])
    assert (experts[0, :48] - gate).std() / gate.std() == pytest.approx(0.01, rel=0.3)
    # Every token is routed by its modality's fresh router: image tokens by the image group, text tokens by the
    # text group, each to 2 experts whose weights sum to one (the dense MLP's output, up to the noise).
    inputs = verification_inputs(model.config)
    with torch.no_grad():
        records = model(**inputs, output_routing=True).routing
    is_image = (inputs["input_ids"] == model.config.image_token_id).flatten()
    assert sorted((r.layer_idx, r.group) for r in records) == [(0, "image"), (0, "text"), (2, "image"), (2, "text")]
    for record in records:
        tokens = is_image.nonzero() if record.group == "image" else (~is_image).nonzero()
        assert torch.equal(record.token_index.sort().values, tokens.flatten())
        assert ((record.routing_weights > 0).sum(-1) == 2).all()
        torch.testing.assert_close(record.routing_weights.sum(-1), torch.ones(len(tokens)))
    with pytest.raises(ValueError, match="Cannot upcycle a 'gpt2' language model"):
        sparse_text_config_from_dense(type("C", (), {"model_type": "gpt2"})())
    with pytest.raises(ValueError, match="norm_topk_prob=True"):
        upcycle_llava(llava, norm_topk_prob=False)


@pytest.mark.slow
def test_upcycle_llava_script_writes_a_verified_checkpoint(tmp_path):
    llava = save_llava(tmp_path / "llava", "qwen2", "siglip")
    output = tmp_path / "moe"
    result = subprocess.run(
        [sys.executable, str(ROOT / "conversion" / "upcycle_llava.py"), "--input", str(tmp_path / "llava"),
         "--output", str(output), "--sparse_layers", "0,2", "--router_type", "top_p", "--num_image_experts", "2",
         "--base_model", "llava-hf/tiny-llava", "--max_shard_size", "100KB"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"max abs logit difference vs LLaVA\s+\d\.\d\de-\d\d", result.stdout)
    assert re.search(r"greedy tokens equal to LLaVA\s+yes", result.stdout)
    assert re.search(r"sparse layers\s+2 of 3: \[0, 2\]", result.stdout)
    assert len(list(output.glob("model-*.safetensors"))) > 1
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(output).eval()
    inputs = verification_inputs(model.config)
    assert (logits(model, inputs) - logits(llava, inputs)).abs().max() < 1e-5
    # The processor uses LLaVA's tokenizer and normalisation, and expands <image> to the tower's patch count.
    processor = SparseMoEVLMProcessor.from_pretrained(output)
    assert processor.image_token_id == model.config.image_token_id and processor.image_seq_length == 16
    assert list(processor.image_processor.image_mean) == [0.48, 0.46, 0.41]
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == "llava-hf/tiny-llava" and "sparse upcycling of LLaVA" in card.text
    assert json.loads((output / "conversion.json").read_text())["options"]["router_type"] == "top_p"
    assert not list(tmp_path.glob(".moe.partial-*"))


def test_upcycle_script_validates_before_writing(tmp_path, capsys):
    script = load_conversion_script("upcycle_llava")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("user data")
    assert script.main(["--input", str(tmp_path / "llava"), "--output", str(occupied)]) == 1
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    assert script.main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "out")]) == 1
    assert "has no config.json" in capsys.readouterr().err
    causal = tmp_path / "causal"
    AutoModelForCausalLM.from_config(tiny_llava().config.text_config).save_pretrained(causal)
    assert script.main(["--input", str(causal), "--output", str(tmp_path / "out")]) == 1
    assert "holds a 'llama' model; this script converts 'llava'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    with pytest.raises(SystemExit):
        script.main(["--help"])
    assert "Sparse upcycling of a Transformers LLaVA checkpoint" in capsys.readouterr().out


def test_a_failed_verification_leaves_no_checkpoint(tmp_path):

    llava = save_llava(tmp_path / "llava")
    script = load_conversion_script("upcycle_llava")
    model = upcycle_llava(llava)
    processor = script.processor_from_llava(LlavaProcessor.from_pretrained(tmp_path / "llava"), model.config)

    def broken_check(reloaded):
        raise RuntimeError("simulated mismatch")

    with pytest.raises(RuntimeError, match="simulated mismatch"):
        write_converted_checkpoint(model, processor, tmp_path / "out", verify=broken_check)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    # --overwrite replaces an existing folder only once the new checkpoint is verified.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="simulated mismatch"):
        write_converted_checkpoint(model, processor, tmp_path / "out", overwrite=True, verify=broken_check)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    write_converted_checkpoint(model, processor, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / "old.txt").exists()


def save_parts(folder: Path, text: str = "llama", vision: str = "clip_dual", tie: bool = False) -> tuple[Path, Path]:
    """A vision encoder folder and a causal LM folder whose tokenizer has no image token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        AutoConfig,
        CLIPConfig,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    vision_dir, lm_dir = folder / "vision", folder / "lm"
    if vision == "clip_dual":
        encoder = CLIPModel(CLIPConfig(vision_config=VISION_CONFIGS["clip"], text_config={
            "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}))
        CLIPImageProcessorPil(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2]).save_pretrained(vision_dir)
    else:
        encoder = Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                           image_size=32, patch_size=8))
    encoder.save_pretrained(vision_dir)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=290, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(lm_dir)
    lm_config = AutoConfig.for_model(text, **{**TEXT_CONFIG, "vocab_size": len(tokenizer)}, tie_word_embeddings=tie,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(lm_config).save_pretrained(lm_dir)
    return vision_dir, lm_dir


@pytest.mark.parametrize("text,vision,tie", [("llama", "clip_dual", False), ("qwen2", "dinov2", True)])
@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_composed_model_reproduces_the_lm_on_text_and_the_encoder_on_images(tmp_path, text, vision, tie, router_type):
    script = load_conversion_script("compose")
    vision_dir, lm_dir = save_parts(tmp_path, text, vision, tie)
    args = script.build_parser().parse_args(["--vision", str(vision_dir), "--language_model", str(lm_dir),
                                             "--output", str(tmp_path / "out"), "--router_type", router_type,
                                             "--sparse_layers", "all", "--num_shared_experts", "1"])
    model, processor, lm, encoder, old_vocab = script.compose(args)
    checks = script.check_against_parts(model, lm, encoder, old_vocab, exact=True)
    assert float(checks["max abs text logit difference vs LM"]) < 1e-5
    assert float(checks["max abs feature difference vs encoder"]) < 1e-5
    # The tokenizer gained the image token; the embedding matrix grew by one row set to the mean of the others.
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id == old_vocab
    assert model.config.text_config.vocab_size == old_vocab + 1
    embeddings = model.get_input_embeddings().weight
    torch.testing.assert_close(embeddings[old_vocab], lm.get_input_embeddings().weight.mean(0))
    assert (model.lm_head.weight is embeddings) == tie
    prompt = processor(text=["<image>a red circle"], images=[torch.rand(3, 32, 32)], return_tensors="pt")
    assert int((prompt["input_ids"] == old_vocab).sum()) == model.config.image_seq_length
    with torch.no_grad():
        assert torch.isfinite(model(**prompt).logits).all()


@pytest.mark.slow
def test_compose_script_end_to_end_and_its_errors(tmp_path):
    vision_dir, lm_dir = save_parts(tmp_path)
    output = tmp_path / "composed"
    command = [sys.executable, str(ROOT / "conversion" / "compose.py"), "--vision", str(vision_dir),
               "--language_model", str(lm_dir), "--output", str(output), "--per_expert_layout"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"image token\s+'<image>' = id \d+", result.stdout)
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(output)
    from hf_sparsemoe_vlm.app.model_card import parameter_counts

    counts = parameter_counts(model)
    assert re.search(rf"total parameters\s+{counts['total']:,}\n", result.stdout)
    assert re.search(rf"active per text token \(decoder\)\s+{counts['active_per_text_token']:,}\n", result.stdout)
    assert re.search(r"sparse layers\s+1 of 3: \[1\]", result.stdout)
    assert re.search(r"layout\s+per-expert tensors", result.stdout)
    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert f"| total | {counts['total']:,} |" in card.text
    assert list(SparseMoEVLMProcessor.from_pretrained(output).image_processor.image_mean) == [0.5, 0.4, 0.3]
    assert model.config.text_config.mlp_layer_types == ["dense", "sparse", "dense"]
    # Rerunning without --overwrite refuses and leaves the checkpoint alone.
    before = sorted(p.name for p in output.iterdir())
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "not empty; pass --overwrite" in again.stderr
    assert sorted(p.name for p in output.iterdir()) == before

    script = load_conversion_script("compose")
    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(__import__("transformers").GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    assert script.main(["--vision", str(vision_dir), "--language_model", str(gpt2),
                        "--output", str(tmp_path / "never")]) == 1
    assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0


def test_an_interrupted_write_leaves_no_checkpoint(tmp_path, monkeypatch):

    llava = save_llava(tmp_path / "llava")
    model = upcycle_llava(llava)
    processor = load_conversion_script("upcycle_llava").processor_from_llava(LlavaProcessor.from_pretrained(tmp_path / "llava"),
                                                                  model.config)
    written = []

    def interrupted_save(self, folder, *args, **kwargs):  # Ctrl-C after the weights, before the processor
        written.extend(p.name for p in Path(folder).iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(type(processor), "save_pretrained", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        write_converted_checkpoint(model, processor, tmp_path / "out")
    assert "model.safetensors" in written  # the weights had been written (to the hidden staging folder) ...
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))  # ... and are gone


def test_leftovers_are_matched_by_exact_name_not_as_a_glob(tmp_path, capsys):
    """A conversion into `moe[4]` must not take what a killed conversion into `moe4` set aside (a glob would match
    `.moe4.old-<pid>` for `.moe[4].old-*`)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = tmp_path / f".moe4.old-{dead.pid}"
    other.mkdir()
    (other / "config.json").write_text("{}")
    check_output_dir(tmp_path / "moe[4]", overwrite=False)
    assert other.is_dir() and not (tmp_path / "moe[4]").exists() and "Restoring" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="not empty"):  # its own leftovers are still recovered (then in the way)
        check_output_dir(tmp_path / "moe4", overwrite=False)
    assert (tmp_path / "moe4" / "config.json").is_file() and not other.exists()


def test_a_safetensors_error_while_writing_is_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    """A full disk surfaces from safetensors as SafetensorError, not OSError: the script still reports it and
    leaves no folder."""
    from safetensors import SafetensorError

    save_llava(tmp_path / "llava")

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(SparseMoEVLMForConditionalGeneration, "save_pretrained", disk_full)
    script = load_conversion_script("upcycle_llava")
    assert script.main(["--input", str(tmp_path / "llava"), "--output", str(tmp_path / "out")]) == 1
    assert "error: Error while serializing: IoError(No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava"]


@pytest.mark.parametrize("broken", ["vision", "lm"])
def test_corrupt_source_weights_are_an_error_naming_the_folder(tmp_path, capsys, broken):
    """A truncated download of any source fails with a message naming the part and folder, nothing is written, and
    the source is left as it was."""
    llava_dir = tmp_path / "llava"
    save_llava(llava_dir)
    vision_dir, lm_dir = save_parts(tmp_path)
    weights = {"vision": vision_dir, "lm": lm_dir}[broken] / "model.safetensors"
    for path in (weights, llava_dir / "model.safetensors"):
        path.write_bytes(path.read_bytes()[:3000])
    truncated = weights.read_bytes()

    assert load_conversion_script("upcycle_llava").main(["--input", str(llava_dir), "--output", str(tmp_path / "a")]) == 1
    assert f"error: Could not load the LLaVA model from {llava_dir}: SafetensorError" in capsys.readouterr().err
    assert load_conversion_script("compose").main(["--vision", str(vision_dir), "--language_model", str(lm_dir),
                                        "--output", str(tmp_path / "b")]) == 1
    part = {"vision": "the vision encoder", "lm": "the language model"}[broken]
    folder = {"vision": vision_dir, "lm": lm_dir}[broken]
    error = capsys.readouterr().err
    assert f"error: Could not load {part} from {folder}: SafetensorError" in error and "re-download" in error
    assert weights.read_bytes() == truncated
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not list(tmp_path.glob(".[ab].*"))


@pytest.mark.parametrize("script", ["upcycle_llava", "compose", "convert_moe_llava"])
def test_a_bad_shard_size_is_refused_when_the_arguments_are_parsed(script, tmp_path, capsys):
    inputs = {"upcycle_llava": ["--input", str(tmp_path)], "convert_moe_llava": ["--input", str(tmp_path)],
              "compose": ["--vision", str(tmp_path), "--language_model", str(tmp_path)]}[script]
    with pytest.raises(SystemExit) as exit_info:
        load_conversion_script(script).main([*inputs, "--output", str(tmp_path / "out"), "--max_shard_size", "lots"])
    assert exit_info.value.code == 2
    assert "argument --max_shard_size: 'lots' is not a shard size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_conversion_killed_mid_write_leaves_no_checkpoint_and_a_rerun_cleans_up(tmp_path):
    import signal

    save_llava(tmp_path / "llava")
    output = tmp_path / "out"
    command = [str(ROOT / "conversion" / "upcycle_llava.py"), "--input", str(tmp_path / "llava"), "--output",
               str(output)]
    # SIGKILL (no cleanup code runs) once the weights are written, before the processor files.
    killed = f"""
import os, runpy, signal, sys
from hf_sparsemoe_vlm import SparseMoEVLMProcessor
SparseMoEVLMProcessor.save_pretrained = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
sys.argv = {command!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    result = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not output.exists()
    (staging,) = tmp_path.glob(".out.partial-*")  # hidden, and without the files a checkpoint needs
    assert (staging / "model.safetensors").is_file() and not (staging / "processor_config.json").exists()

    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"Removing {staging}, left by an interrupted conversion" in result.stdout
    assert not list(tmp_path.glob(".out.partial-*"))
    assert SparseMoEVLMProcessor.from_pretrained(output).image_seq_length == 16


def _stored_tensors(folder: Path) -> tuple[dict[str, str], int]:
    """`{name: safetensors dtype}` of every tensor a checkpoint folder stores, and its number of safetensors files
    (a sharded folder's index must list exactly those tensors)."""
    from safetensors import safe_open

    tensors, files = {}, sorted(folder.glob("*.safetensors"))
    for path in files:
        with safe_open(path, "pt") as weights:
            tensors |= {key: weights.get_slice(key).get_dtype() for key in weights.keys()}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        assert set(json.loads(index.read_text())["weight_map"]) == set(tensors)
    return tensors, len(files)


def _stored_dtypes(folder: Path) -> set[str]:
    return set(_stored_tensors(folder)[0].values())


@pytest.mark.parametrize("source_dtype, option, stored", [
    (torch.bfloat16, [], "BF16"),  # auto: the source's dtype
    (torch.float32, [], "F32"),
    (torch.float32, ["--dtype", "float16"], "F16"),  # checked against LLaVA rounded to float16
    (torch.bfloat16, ["--dtype", "float32"], "F32"),
    # ReLU bias 1/3 and shared share 1/3 are not representable in bfloat16: reproduced up to that rounding.
    (torch.bfloat16, ["--router_type", "relu", "--num_experts", "3", "--num_image_experts", "3",
                      "--num_shared_experts", "2"], "BF16"),
    (torch.bfloat16, ["--router_type", "relu", "--num_experts", "3", "--num_image_experts", "3",
                      "--num_shared_experts", "2", "--dtype", "float32"], "F32"),
])
def test_upcycle_writes_the_source_dtype_or_the_chosen_one_and_stays_exact(tmp_path, capsys, source_dtype, option,
                                                                            stored):

    llava = save_llava(tmp_path / "llava", "qwen2", "siglip")
    llava.to(source_dtype).save_pretrained(tmp_path / "llava")
    output = tmp_path / "out"
    assert load_conversion_script("upcycle_llava").main(["--input", str(tmp_path / "llava"), "--output", str(output),
                                              "--router_type", "top_p", "--sparse_layers", "all", *option]) == 0
    summary = capsys.readouterr().out
    assert re.search(r"greedy tokens equal to LLaVA\s+yes", summary)
    assert _stored_dtypes(output) == {stored}
    written_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[stored]
    model = SparseMoEVLMForConditionalGeneration.from_pretrained(output)
    assert model.dtype == written_dtype
    # Up-cast, the written model reproduces LLaVA with its weights rounded to the written dtype.
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava", dtype=torch.float32).eval()
    for parameter in reference.parameters():
        parameter.data = parameter.data.to(written_dtype).float()
    inputs = verification_inputs(model.config)
    expected = logits(reference, inputs)
    difference = (logits(model.float(), inputs) - expected).abs().max().item()
    assert difference < logits_tolerance(written_dtype, expected)
    assert float(re.search(r"max abs logit difference vs LLaVA\s+(\S+)", summary).group(1)) == pytest.approx(
        difference, rel=1e-2, abs=1e-9)
    if written_dtype == torch.float32:
        assert difference < 1e-5


def test_logits_tolerance_is_exact_in_float32_and_one_rounding_step_in_half_precision():

    logits_ = torch.tensor([[-3.0, 0.5], [2.0, 8.0]])
    assert logits_tolerance(torch.float32, logits_) == 1e-5
    assert logits_tolerance(torch.bfloat16, logits_) == pytest.approx(1e-5 + 8 * 2 ** -7)
    assert logits_tolerance(torch.float16, logits_ / 100) == pytest.approx(1e-5 + 2 ** -10)


def test_compose_writes_the_chosen_dtype(tmp_path, capsys):
    vision_dir, lm_dir = save_parts(tmp_path)
    output = tmp_path / "out"
    assert load_conversion_script("compose").main(["--vision", str(vision_dir), "--language_model", str(lm_dir),
                                        "--output", str(output), "--dtype", "bfloat16", "--router_type", "relu",
                                        "--num_experts", "3", "--num_image_experts", "3"]) == 0
    assert re.search(r"dtype\s+bfloat16", capsys.readouterr().out)
    assert _stored_dtypes(output) == {"BF16"}
    assert SparseMoEVLMForConditionalGeneration.from_pretrained(output).dtype == torch.bfloat16


def test_a_checkpoint_whose_weights_differ_from_the_converted_model_is_not_kept(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file


    llava = save_llava(tmp_path / "llava")
    model = upcycle_llava(llava)
    processor = load_conversion_script("upcycle_llava").processor_from_llava(LlavaProcessor.from_pretrained(tmp_path / "llava"),
                                                                  model.config)
    save_processor = type(processor).save_pretrained

    def save_and_corrupt(self, folder, *args, **kwargs):  # a writer bug: one stored tensor is off
        weights = load_file(Path(folder) / "model.safetensors")
        weights["model.language_model.norm.weight"] += 1e-3
        save_file(weights, Path(folder) / "model.safetensors", metadata={"format": "pt"})
        return save_processor(self, folder, *args, **kwargs)

    monkeypatch.setattr(type(processor), "save_pretrained", save_and_corrupt)
    with pytest.raises(RuntimeError, match=r"does not hold the converted weights \(1 tensors differ or are missing, "
                                           r"e\.g\. \['model\.language_model\.norm\.weight'\]\)"):
        write_converted_checkpoint(model, processor, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.slow
def test_a_conversion_killed_mid_overwrite_swap_gets_the_previous_checkpoint_back(tmp_path, capsys):
    import signal

    save_llava(tmp_path / "llava")
    output = tmp_path / "out"
    command = [str(ROOT / "conversion" / "upcycle_llava.py"), "--input", str(tmp_path / "llava"), "--output",
               str(output)]
    script = load_conversion_script("upcycle_llava")
    assert script.main([*command[1:], "--router_type", "relu"]) == 0
    previous = {p.name: p.read_bytes() for p in output.iterdir()}
    # SIGKILL right after the previous checkpoint was set aside, before the new one is moved into place.
    killed = f"""
import os, runpy, signal, sys
replace = os.replace
def replace_then_die(source, target):
    replace(source, target)
    if ".old-" in str(target):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then_die
sys.argv = {[*command, "--overwrite"]!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    result = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not output.exists()
    (old,) = tmp_path.glob(".out.old-*")
    (staging,) = tmp_path.glob(".out.partial-*")

    # The next conversion into the folder puts the previous checkpoint back, then (no --overwrite) refuses.
    capsys.readouterr()
    assert script.main(command[1:]) == 1
    captured = capsys.readouterr()
    assert f"Restoring {output} from {old}" in captured.out and f"Removing {staging}" in captured.out
    assert "not empty; pass --overwrite" in captured.err
    assert {p.name: p.read_bytes() for p in output.iterdir()} == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava", "out"]
    assert SparseMoEVLMForConditionalGeneration.from_pretrained(output).config.text_config.router_type == "relu"


@pytest.mark.parametrize("script_name, arguments", [
    ("upcycle_llava", ["--input", "{llava}", "--output", "{llava}"]),
    ("upcycle_llava", ["--input", "{llava}", "--output", "{llava}/moe"]),
    ("compose", ["--vision", "{vision}", "--language_model", "{lm}", "--output", "{lm}"]),
    ("compose", ["--vision", "{vision}", "--language_model", "{lm}", "--output", "{vision}/.."]),
])
def test_output_over_a_source_checkpoint_is_refused_even_with_overwrite(tmp_path, capsys, script_name, arguments):
    save_llava(tmp_path / "llava")
    vision_dir, lm_dir = save_parts(tmp_path)
    folders = {"llava": tmp_path / "llava", "vision": vision_dir, "lm": lm_dir}
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    arguments = [argument.format(**folders) for argument in arguments]
    assert load_conversion_script(script_name).main([*arguments, "--overwrite"]) == 1
    assert "would overwrite the checkpoint being converted; choose a separate folder" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.parametrize("script_name", ["upcycle_llava", "compose"])
def test_export_sharded_and_per_expert_layouts_reload_to_identical_logits(tmp_path, capsys, script_name):
    if script_name == "upcycle_llava":
        save_llava(tmp_path / "llava")
        source = ["--input", str(tmp_path / "llava")]
    else:
        vision_dir, lm_dir = save_parts(tmp_path)
        source = ["--vision", str(vision_dir), "--language_model", str(lm_dir)]
    script = load_conversion_script(script_name)
    layouts = {"fused": [], "fused, sharded": ["--max_shard_size", "30KB"],
               "per-expert, sharded": ["--max_shard_size", "30KB", "--per_expert_layout"]}
    loaded = {}
    for name, options in layouts.items():
        output = tmp_path / name.replace(", ", "-")
        assert script.main([*source, "--output", str(output), "--sparse_layers", "0,2", "--num_experts", "3",
                            "--num_image_experts", "2", *options]) == 0
        summary = capsys.readouterr().out
        assert re.search(r"layout\s+" + ("per-expert tensors" if "--per_expert_layout" in options else
                                         "fused expert tensors"), summary)
        tensors, files = _stored_tensors(output)
        keys = set(tensors)
        fused = {k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
        per_expert = {k for k in keys if re.search(r"_moe\.experts\.\d+\.(gate|up|down)_proj\.weight$", k)}
        if "--per_expert_layout" in options:  # 2 sparse layers x (3 text + 2 image experts) x 3 projections
            assert not fused and len(per_expert) == 2 * 5 * 3
            assert "model.language_model.layers.2.mlp.image_moe.experts.1.down_proj.weight" in keys
        else:
            assert len(fused) == 2 * 2 * 2 and not per_expert
        assert (files > 1) == ("--max_shard_size" in options)
        loaded[name] = SparseMoEVLMForConditionalGeneration.from_pretrained(output).eval()
    for model in loaded.values():  # fresh memory: memory-mapped weights can take other CPU kernels (~1e-7 apart)
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
    reference = loaded.pop("fused")
    inputs = verification_inputs(reference.config)
    expected = logits(reference, inputs)
    for name, model in loaded.items():
        for key, tensor in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], tensor), (name, key)
        assert torch.equal(logits(model, inputs), expected), name
