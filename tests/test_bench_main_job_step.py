import json

import pytest
import torch

from tiny_models import load_benchmark_script


@pytest.mark.slow
def test_step_benchmark_times_each_decoder_variant_in_turns_and_writes_results(tmp_path):
    benchmark = load_benchmark_script("bench_main_job_step")
    output = tmp_path / "step.json"
    threads = torch.get_num_threads()
    report = benchmark.main(["--rounds", "2", "--steps", "1", "--batches", "1", "--batch_size", "2", "--warmup", "0",
                             "--variants", "default", "mha16=num_attention_heads=8,num_key_value_heads=8,head_dim=16",
                             "--dense_variants", "dense", "--output", str(output)])
    variants = report["variants"]
    assert list(variants) == ["default", "mha16", "dense"]
    assert variants["default"]["ratio"] == 1.0 and all(len(v["ms_per_step"]) == 2 for v in variants.values())
    # 8 KV heads of 16 dims instead of 2 of 32: k_proj and v_proj grow from 128x64 to 128x128 in each of 4 layers.
    assert variants["mha16"]["parameters"] - variants["default"]["parameters"] == 2 * 128 * 64 * 4
    assert variants["dense"]["dense"] and variants["dense"]["parameters"] < variants["default"]["parameters"]
    assert json.loads(output.read_text()) == report and report["threads"] == 1
    assert torch.get_num_threads() == threads  # the process's own setting is back (later tests compare logits)


def test_step_benchmark_refuses_unnamed_and_repeated_variants():
    benchmark = load_benchmark_script("bench_main_job_step")
    with pytest.raises(ValueError, match="expected NAME or NAME=key=value"):
        benchmark.main(["--variants", "=num_attention_heads=8"])
    with pytest.raises(SystemExit):
        benchmark.main(["--variants", "default", "--dense_variants", "default"])
