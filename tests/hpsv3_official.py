"""Runs the official ``hpsv3`` package's reward model on tiny random weights, under the transformers it pins
(4.45.2), for ``tests/test_fidelity.py::test_hpsv3_matches_official``. Run by that environment's interpreter:

    python tests/hpsv3_official.py WORKDIR

WORKDIR holds ``config.json`` (a Qwen2-VL config in the 4.45 layout), ``images/*.png`` and ``prompts.json``;
the tokenizer is the repository's ``assets/tokenizers/tiny-qwen2vl`` (Qwen2-VL's special tokens, a chat template). Writes ``HPSv3.safetensors`` (the model's
state dict, keyed as the released checkpoint is) and ``official.json`` (scores, input ids, pixel values' sum).

The package's modules import its trainer stack (TRL, DeepSpeed, tensorboard) at the top; only three pieces run
here, taken from the installed package's own source: the reward model class ``Qwen2VLRewardModelBT``, the
inferencer's ``prepare_batch`` / ``reward`` methods, and the image fetch ``process_vision_info`` with the prompt
strings. The model is built as the package's ``create_model_and_processor`` builds it (the ``<|Reward|>`` token
added, the embeddings resized, the ranknet head), then every weight matrix redrawn with a seed so that scores
differ between images.
"""
import ast
import importlib.util
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import List, Optional

import safetensors.torch
import torch
import torch.nn as nn
import transformers
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizers" / "tiny-qwen2vl"
PKG = Path(importlib.util.find_spec("hpsv3").submodule_search_locations[0])  # not imported: its __init__ loads the trainer


def _source_part(path: Path, names: set[str], namespace: dict) -> dict:
    """Execute the top-level class / assignment definitions ``names`` of a package file, verbatim."""
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if (isinstance(n, ast.ClassDef) and n.name in names)
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names for t in n.targets))]
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def main(work: Path):
    assert transformers.__version__ == "4.45.2", transformers.__version__
    spec = importlib.util.spec_from_file_location("hpsv3_dataset_utils", PKG / "dataset" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    ns = _source_part(PKG / "dataset" / "data_collator_qwen.py",
                      {"INSTRUCTION", "prompt_with_special_token", "prompt_without_special_token"}, {})
    ns.update(torch=torch, nn=nn, Optional=Optional, List=List, Mapping=Mapping,
              Qwen2VLForConditionalGeneration=Qwen2VLForConditionalGeneration,
              process_vision_info=utils.process_vision_info)
    _source_part(PKG / "model" / "qwen2vl_trainer.py", {"Qwen2VLRewardModelBT"}, ns)
    _source_part(PKG / "inference.py", {"HPSv3RewardInferencer"}, ns)

    tok = AutoTokenizer.from_pretrained(TOKENIZER, padding_side="right")
    processor = transformers.Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok, chat_template=tok.chat_template)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    special = processor.tokenizer.convert_tokens_to_ids(["<|Reward|>"])
    config = Qwen2VLConfig(**json.loads((work / "config.json").read_text()))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = ns["Qwen2VLRewardModelBT"](config, output_dim=2, reward_token="special", special_token_ids=special,
                                       rm_head_type="ranknet", rm_head_kwargs=None)
    model.resize_token_embeddings(len(processor.tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    model.eval()
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, work / "HPSv3.safetensors")

    inf = object.__new__(ns["HPSv3RewardInferencer"])
    inf.model, inf.processor, inf.device, inf.use_special_tokens = model, processor, "cpu", True
    paths = sorted(str(p) for p in (work / "images").glob("*.png"))
    prompts = json.loads((work / "prompts.json").read_text())
    with torch.no_grad():
        batch = inf.prepare_batch(paths, prompts)
        logits = inf.reward(paths, prompts)
    json.dump({"mu": logits[:, 0].tolist(), "sigma": logits[:, 1].tolist(),
               "input_ids": batch["input_ids"].tolist(), "image_grid_thw": batch["image_grid_thw"].tolist(),
               "pixel_values_sum": batch["pixel_values"].double().sum().item(), "transformers": transformers.__version__},
              open(work / "official.json", "w"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
