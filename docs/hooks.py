"""MkDocs build hook: the loss and config reference pages are generated from the code at every build (so they cannot
drift from it), as virtual files -- nothing generated is written into docs/."""
from __future__ import annotations

from mkdocs.structure.files import File


def _losses_page() -> str:
    from mmalign.losses import LOSSES

    out = ["# Loss reference", "",
           "Every entry of `mmalign.losses.LOSSES` (generated from the code; `mmalign losses` prints the first line of "
           "each). Pairwise losses take `(policy_chosen, policy_rejected, ref_chosen, ref_rejected)` per-sample scores and "
           "keyword hyper-parameters, and return `(per_example_loss, metrics)`; the other kinds are described in "
           "`mmalign/losses/_common.py`. Scores are summed completion log-probs for text, VLMs and captioners, `-mse` "
           "for diffusion and flow matching (Diffusion-DPO's beta convention: see Diffusion-DPO).", "",
           "| loss | kind | equation and paper |", "|---|---|---|"]
    for name in sorted(LOSSES):
        fn = LOSSES[name]
        doc = " ".join((fn.__doc__ or "").split()).replace("|", "\\|")
        out.append(f"| `{name}` | {fn.kind} | {doc} |")
    return "\n".join(out) + "\n"


def _config_page() -> str:
    from mmalign.config_doc import markdown
    from mmalign.train.sections import RECIPES

    return markdown(RECIPES)


def on_files(files, config):
    for path, make in (("reference/losses.md", _losses_page), ("reference/config.md", _config_page)):
        files.append(File.generated(config, path, content=make()))
    return files
