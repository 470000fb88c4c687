"""Reward fidelity: the same random weights in the official implementation and in ours give the same scores
on the same images, preprocessing included (non-square images of odd sizes, so resize / crop / pad
rounding is exercised). The official packages are test-only dependencies, installed without their pins
(``requirements/fidelity.txt``):

* CLIPScore   ``torchmetrics.multimodal.CLIPScore`` (100 x max(cos, 0)); ours is 2.5 x max(cos, 0). torchmetrics
              1.9 reads transformers 4's tensor from ``get_*_features``; the test hands it that tensor
* HPSv2       ``hpsv2x`` 1.2.0 (the ``hpsv2`` 1.2.0 wheel lacks its tokenizer vocabulary file)
* ImageReward ``image-reward`` 1.5: its BLIP code imports transformers-4 helpers that moved in
              transformers 5, so the package cannot be imported unpatched; ``official_imagereward`` adds the
              five missing helpers (copied semantics, not code) and runs its own ViT, BERT, MLP, preprocessing
              and scoring steps
* aesthetic   ``simple-aesthetics-predictor`` 0.1.2 (the LAION improved-aesthetic-predictor MLP on
              CLIPVisionModelWithProjection); the original repository is not a package
* HPSv3       ``hpsv3`` 1.0.0: it pins transformers 4.45.2, so it runs in its own venv (``scripts/hpsv3_env.sh``;
              ``tests/hpsv3_official.py`` builds its model class and runs its inferencer there) and the scores
              come back as JSON
* VQAScore    ``t2v-metrics`` 3.0, its transformers-based PaliGemma judge (the package's __init__ needs ffmpeg
              and pins torch 2.5 / transformers 4.49: ``t2v_paligemma`` loads the judge's own file)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.paths import ASSETS
from mmalign.rewards import load_reward

SIZES = [(61, 40), (40, 61), (33, 33), (100, 45)]


def need(module: str):
    """Import an official package; skip without it -- unless MMALIGN_REQUIRE_FIDELITY=1 (CI), then fail."""
    import importlib
    import os

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("MMALIGN_REQUIRE_FIDELITY") == "1":
            raise
        pytest.skip(f"{module} not installed ({e}): pip install --no-deps -r requirements/fidelity.txt")


def images(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


PROMPTS = ["a red circle", "a blue square on a dark background", "a green triangle", "an orange square"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny transformers CLIP + processor saved to disk, as a hub checkpoint would be."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from mmalign.rewards.models import _tiny_hf_clip

    d = tmp_path_factory.mktemp("clip")
    b = _tiny_hf_clip(projection_dim=32)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=b.tokenizer).save_pretrained(d)
    b.model.save_pretrained(d)
    return d


def test_clipscore_matches_torchmetrics(tiny_clip_dir):
    """torchmetrics' own computation (``_clip_score_update``) with the model and processor it would load; its
    CLIPScore class only accepts a fixed list of hub ids, so the tiny checkpoint goes in through the same
    from_pretrained calls."""
    need("torchmetrics")
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from transformers import CLIPModel, CLIPProcessor

    ours = load_reward("clipscore", model=str(tiny_clip_dir), device="cpu")
    clip, processor = CLIPModel.from_pretrained(str(tiny_clip_dir)), CLIPProcessor.from_pretrained(str(tiny_clip_dir))

    class V4Features:  # torchmetrics 1.9 expects transformers 4's tensors from get_*_features; v5 returns outputs
        config = clip.config

        def get_image_features(self, *a, **kw):
            return clip.get_image_features(*a, **kw).pooler_output

        def get_text_features(self, *a, **kw):
            return clip.get_text_features(*a, **kw).pooler_output

        def to(self, device):
            clip.to(device)
            return self

    model = V4Features()
    ims = images(1)
    tensors = [torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in ims]
    theirs, _ = _clip_score_update(tensors, ["A photo depicts " + p for p in PROMPTS], model, processor)
    torch.testing.assert_close(ours.score(ims, PROMPTS) * 40, theirs.float().clamp(min=0), rtol=1e-5, atol=1e-4)
    raw, _ = _clip_score_update(tensors, PROMPTS, model, processor)  # the unclamped cosine: our clip_t
    clip_t = load_reward("clip_t", model=str(tiny_clip_dir), device="cpu")
    torch.testing.assert_close(clip_t.score(ims, PROMPTS) * 100, raw.float(), rtol=1e-5, atol=1e-4)


def test_hpsv2_matches_the_official_package():
    hf = need("hpsv2.src.open_clip.factory")
    import open_clip

    from mmalign.rewards.backbones import OpenClip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    hf._MODEL_CONFIGS["mmalign-tiny-test"] = cfg
    torch.manual_seed(0)
    model, _, preprocess_val = hf.create_model_and_transforms(
        "mmalign-tiny-test", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    model.eval()
    tok = hf.get_tokenizer("mmalign-tiny-test")
    ims = images(2)
    with torch.no_grad():  # the package's img_score: features of both towers, diagonal of image @ text
        out = model(torch.stack([preprocess_val(im) for im in ims]), tok(PROMPTS))
        theirs = torch.diagonal(out["image_features"] @ out["text_features"].T)
    mine_model = open_clip.model.CLIP(**cfg)
    mine_model.load_state_dict(model.state_dict())
    reward = load_reward("hpsv2", tiny=True, device="cpu")
    reward.backbone = OpenClip(mine_model, open_clip.SimpleTokenizer(context_length=77), size=32, mode="pad")
    torch.testing.assert_close(reward.score(ims, PROMPTS), theirs, rtol=1e-5, atol=1e-5)


def official_imagereward():
    """The image-reward package's modules, importable on transformers 5 after restoring the helpers its
    BLIP BERT (med.py) expects from transformers 4."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        mu.find_pruneable_heads_and_indices = lambda *a, **k: (_ for _ in ()).throw(NotImplementedError())
    official = need("ImageReward.ImageReward")  # the module (the package re-exports the class under this name)
    med, vit = need("ImageReward.models.BLIP.med"), need("ImageReward.models.BLIP.vit")

    def invert_attention_mask(self, m):
        ext = (m[:, None, None, :] if m.dim() == 2 else m[:, None, :, :]).to(self.dtype)
        return (1.0 - ext) * torch.finfo(self.dtype).min

    med.BertModel.all_tied_weights_keys = {}
    med.BertModel.invert_attention_mask = invert_attention_mask
    med.BertModel.get_head_mask = lambda self, head_mask, n, chunked=False: [None] * n
    return official, med, vit


def test_imagereward_matches_the_official_code_path():
    official, med, vit = official_imagereward()
    from transformers import AutoTokenizer

    from mmalign.rewards.imagereward import (ImageRewardModel, _Backbone, convert_official_state, text_config,
                                             vision_config)

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / "tiny-bpe"))
    med_cfg = {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 37, "max_position_embeddings": 64, "pad_token_id": tok.pad_token_id,
               "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
               "attention_probs_dropout_prob": 0.1, "type_vocab_size": 2, "initializer_range": 0.02,
               "add_cross_attention": True}
    torch.manual_seed(0)
    visual = vit.VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=4).eval()
    bcfg = med.BertConfig(**med_cfg)
    bcfg.encoder_width = 64
    text = med.BertModel(config=bcfg, add_pooling_layer=False).eval()
    mlp = official.MLP(32).eval()
    transform = official._transform(224)
    ims, scores = images(3), []
    with torch.no_grad():  # ImageReward.score, step by step, for each (prompt, image)
        for p, im in zip(PROMPTS, ims):
            t = tok(p, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            emb = visual(transform(im).unsqueeze(0))
            out = text(t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=emb,
                       encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long), return_dict=True)
            r = (mlp(out.last_hidden_state[:, 0, :].float()) - 0.16717362830052426) / 1.0333394966054072
            scores.append(r.item())
    theirs = torch.tensor(scores)
    state = {**{f"blip.visual_encoder.{k}": v for k, v in visual.state_dict().items()},
             **{f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()},
             **{f"mlp.{k}": v for k, v in mlp.state_dict().items()}}
    net = ImageRewardModel(vision_config(width=64, layers=2, heads=4), text_config(med_cfg, 64))
    missing, unexpected = net.load_state_dict(convert_official_state(state), strict=False)
    assert not missing and not unexpected
    reward = load_reward("imagereward", tiny=True, device="cpu")
    reward.backbone = _Backbone(net, tok)
    torch.testing.assert_close(reward.score(ims, PROMPTS), theirs, rtol=1e-5, atol=1e-5)


def test_aesthetic_matches_simple_aesthetics_predictor(tiny_clip_dir):
    ap = need("aesthetics_predictor")
    from transformers import CLIPProcessor

    ours = load_reward("aesthetic", tiny=True, device="cpu")
    proc = CLIPProcessor.from_pretrained(str(tiny_clip_dir))
    clip = ours.backbone.model
    official = ap.AestheticsPredictorV2Linear(clip.config.vision_config.__class__(
        **{**clip.config.vision_config.to_dict(), "projection_dim": clip.config.projection_dim})).eval()
    state = {k: v for k, v in clip.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    state.update({f"layers.{k.removeprefix('layers.')}": v for k, v in ours.head.state_dict().items()})
    missing, _ = official.load_state_dict(state, strict=False)
    assert not missing
    ims = images(4)
    with torch.no_grad():
        theirs = official(pixel_values=proc(images=ims, return_tensors="pt").pixel_values).logits.squeeze(-1)
    ours.backbone.image_processor = proc.image_processor  # the model's processor, as a hub checkpoint brings
    torch.testing.assert_close(ours.score(ims), theirs, rtol=1e-5, atol=1e-5)


def t2v_paligemma(monkeypatch):
    """t2v-metrics' PaliGemma VQAScore judge, from the installed package's own file. The package cannot be
    imported here: its ``__init__`` requires the ffmpeg binary and imports every judge (pinned to torch 2.5 and
    transformers 4.49), so its parent packages and the two imports this file needs besides transformers (decord,
    for video only, and the ``VQAScoreModel`` base, an abstract interface) are stood in for; its scoring code
    (``PaliGemmaModel.forward``: processor, ``generate`` with ``output_scores``, softmax, answer token) runs as is."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    spec = importlib.util.find_spec("t2v_metrics")  # finds without running the package's __init__
    if spec is None:
        need("t2v_metrics")  # skips, or fails under MMALIGN_REQUIRE_FIDELITY=1
    pkg = Path(spec.submodule_search_locations[0])
    for name, path in (("t2v_metrics", pkg), ("t2v_metrics.models", pkg / "models"),
                       ("t2v_metrics.models.vqascore_models", pkg / "models" / "vqascore_models")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        monkeypatch.setitem(sys.modules, name, mod)
    base = types.ModuleType("t2v_metrics.models.vqascore_models.vqa_model")
    base.VQAScoreModel = object
    monkeypatch.setitem(sys.modules, base.__name__, base)
    decord = types.ModuleType("decord")
    decord.VideoReader, decord.cpu = None, None
    monkeypatch.setitem(sys.modules, "decord", decord)
    name = "t2v_metrics.models.vqascore_models.paligemma_model"
    spec = importlib.util.spec_from_file_location(name, pkg / "models" / "vqascore_models" / "paligemma_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vqascore_matches_t2v_metrics(monkeypatch, tmp_path):
    """VQAScore on the same tiny PaliGemma: t2v-metrics 3.0's judge vs ours, same images and prompts."""
    mod = t2v_paligemma(monkeypatch)
    ours = load_reward("vqascore", tiny=True, device="cpu")
    theirs = mod.PaliGemmaModel.__new__(mod.PaliGemmaModel)  # its __init__ downloads the 3B checkpoint
    theirs.model, theirs.processor, theirs.device = ours.backbone.model, ours.backbone.processor, "cpu"
    ims = images(4)
    paths = []
    for i, im in enumerate(ims):
        im.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    want = theirs.forward(paths, PROMPTS)
    torch.testing.assert_close(ours.score(ims, PROMPTS), want.float(), rtol=1e-5, atol=1e-7)


def hpsv3_python() -> str:
    """The interpreter of the official package's venv (``scripts/hpsv3_env.sh``); skip without it -- unless
    MMALIGN_REQUIRE_FIDELITY=1 (CI), then fail."""
    import os
    from pathlib import Path

    py = Path(os.environ.get("MMALIGN_HPSV3_PYTHON", Path(__file__).resolve().parents[1] / ".venv-hpsv3/bin/python"))
    if not py.exists():
        msg = f"{py} not found: bash scripts/hpsv3_env.sh builds the official hpsv3 package's venv"
        if os.environ.get("MMALIGN_REQUIRE_FIDELITY") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return str(py)


def test_hpsv3_matches_the_official_package(tmp_path):
    """HPSv3: the package's own reward-model class and inferencer (transformers 4.45.2, its own venv) draw tiny
    random weights and score four odd-sized images; ours loads that state dict as it loads the released
    checkpoint (key renaming, no language-model head) and must give the same token ids and the same scores."""
    import json
    import subprocess
    from pathlib import Path

    from mmalign.rewards.hpsv3 import tiny_base

    py = hpsv3_python()
    config, processor = tiny_base()
    base = tmp_path / "base"  # a hub-style base: config + processor, as Qwen/Qwen2-VL-7B-Instruct brings them
    processor.save_pretrained(base)
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", **config}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "images").mkdir()
    ims = images(5)
    for i, im in enumerate(ims):
        im.save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    script = Path(__file__).with_name("hpsv3_official.py")
    run = subprocess.run([py, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads((tmp_path / "official.json").read_text())
    assert len(set(theirs["mu"])) == len(ims)  # the weights separate the images: equality below means something

    ours = load_reward("hpsv3", model=str(tmp_path / "HPSv3.safetensors"), base=str(base), device="cpu")
    assert ours.backbone.inputs(ims, PROMPTS)["input_ids"].tolist() == theirs["input_ids"]
    torch.testing.assert_close(ours.score(ims, PROMPTS), torch.tensor(theirs["mu"]), rtol=1e-5, atol=1e-6)
