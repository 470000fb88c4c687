"""Data never reaches outside its folder unless asked, and reports never execute what the data says."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from mmalign.data.images import contained_path, open_image
from mmalign.data.records import DataError
from mmalign.toyworld.world import synthetic_pairs
from mmalign.diffusion.data import PreferencePairs
from mmalign.eval.report import write_score_gallery as write_html
from mmalign.rewards.scoring import read_prompts


def image_folder(tmp_path: Path, bad_name: str) -> Path:
    """An image-folder pairs dataset whose row 1 names ``bad_name`` as its second image."""
    d = tmp_path / "ds"
    d.mkdir()
    rows = synthetic_pairs(3, seed=1)
    meta = []
    for i, r in enumerate(rows):
        for k in ("0", "1"):
            r[f"jpg_{k}"].save(d / f"{i}_{k}.png")
        meta.append({"caption": r["caption"], "file_name_0": f"{i}_0.png",
                     "file_name_1": bad_name if i == 1 else f"{i}_1.png", "label_0": r["label_0"]})
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    return d


@pytest.fixture
def outside(tmp_path):
    p = tmp_path / "outside.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(p)
    return p


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_imagefolder_rejects_names_outside_the_folder(tmp_path, outside, kind):
    name = {"dotdot": "../outside.png", "absolute": str(outside), "symlink": "link.png"}[kind]
    d = image_folder(tmp_path, name)
    if kind == "symlink":  # a link inside the folder that points out of it
        (d / "link.png").symlink_to(outside)
    with pytest.raises(DataError, match=r"row 1: jpg_1: file name .* resolves outside the dataset folder"):
        PreferencePairs(str(d), resolution=32)
    ok = PreferencePairs(str(d), resolution=32, allow_outside_root=True)  # explicit opt-in for trusted data
    assert len(ok) == 3 and ok[1]["pixels"].shape == (2, 3, 32, 32)


def test_open_image_checks_every_path_it_joins(tmp_path, outside):
    with pytest.raises(DataError, match="outside the dataset folder"):
        open_image("../outside.png", root=tmp_path / "sub")
    with pytest.raises(DataError, match="outside"):
        open_image({"bytes": None, "path": str(outside)}, root=tmp_path / "sub")
    assert open_image("outside.png", root=tmp_path).size == (40, 40)
    assert contained_path(tmp_path, "a/../b.png") == tmp_path / "a/../b.png"


def test_vision_pairs_reject_images_outside_the_data_folder(tmp_path, outside):
    from mmalign.vl.data import VisionPreferenceData
    from mmalign.vl.models import tiny_vlm

    d = tmp_path / "vqa"
    d.mkdir()
    Image.new("RGB", (32, 32)).save(d / "ok.png")
    rows = [{"prompt": "What colour is the shape?", "chosen": "red", "rejected": "blue", "image": "ok.png"},
            {"prompt": "What colour is the shape?", "chosen": "red", "rejected": "blue", "image": "../outside.png"}]
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    _, proc = tiny_vlm(seed=0, hidden=32, layers=1)
    data = VisionPreferenceData(str(d / "pairs.jsonl"), proc, 96, 80)
    assert data[0]["pixel_values"] is not None
    with pytest.raises(DataError, match="row 1: file name '../outside.png' resolves outside"):
        data[1]
    trusted = VisionPreferenceData(str(d / "pairs.jsonl"), proc, 96, 80, allow_outside_root=True)
    assert trusted[1]["pixel_values"] is not None


def test_score_metadata_cannot_name_files_outside_the_image_folder(tmp_path, outside):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "a.png")
    Image.new("RGB", (8, 8)).save(d / "outside.png")  # same basename as the file outside
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "p a"}) + "\n"
                                      + json.dumps({"file_name": "../outside.png", "prompt": "evil"}) + "\n")
    files = [d / "a.png", d / "outside.png"]
    with pytest.raises(DataError, match="row 1: file name '../outside.png' resolves outside"):
        read_prompts(files, None, None, d)
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "p a"}) + "\n"
                                      + json.dumps({"file_name": "outside.png", "prompt": "p o"}) + "\n")
    assert read_prompts(files, None, None, d) == ["p a", "p o"]


def test_html_report_escapes_prompts_and_file_names(tmp_path):
    evil = '<script>alert("x")</script>'
    files = [tmp_path / '<img src=x onerror=alert(1)>.png']
    out = tmp_path / "r.html"
    write_html(str(out), files, [Image.new("RGB", (8, 8))], [evil], {"<b>reward</b>": [0.5]})
    h = out.read_text()
    assert "<script>" not in h and "&lt;script&gt;" in h
    assert "<img src=x" not in h and "&lt;img src=x onerror=alert(1)&gt;.png" in h
    assert "<b>reward</b>" not in h
    assert len(re.findall(r"<script", h, flags=re.I)) == 0

