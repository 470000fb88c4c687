"""VLM judges: VQAScore, and yes/no questions about a prompt's atoms, from any transformers image-text-to-text
model with its processor.

VQAScore (Lin et al. 2024, "Evaluating Text-to-Visual Generation with Image-to-Text Generation", arXiv
2404.01291, Eq. 1): score(image, text) = P("Yes" | image, Q(text)), Q(text) = 'Does this figure show "{text}"?
Please answer yes or no.', read from the model's next-token distribution after the question -- as t2v-metrics'
transformers-based judges do (softmax of the first generated step's logits at the answer's first token). With
``atoms`` (a JSON file {prompt: [question, ...]}, TIFA / GenEval 2 Soft-TIFA style) a prompt's score is the mean
of P("Yes") over its own questions. ``normalise``: P(Yes) / (P(Yes) + P(No)) instead of P(Yes) over the whole
vocabulary.

The answer token is the first token of "Yes" encoded without special tokens; t2v-metrics takes
``tokenizer.encode("Yes")[0]``, the same token wherever the tokenizer adds no BOS (Qwen2's; PaliGemma's processor
turns BOS off). The scores equal t2v-metrics' PaliGemma judge on the same tiny weights (``tests/test_fidelity.py``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mmalign.data.records import DataError

from .models import REWARDS, Reward, pil_images

Tensor = torch.Tensor
QUESTION = 'Does this figure show "{}"? Please answer yes or no.'


def _flag(v) -> bool:
    """A loader argument from the CLI (``--reward-arg vqascore.normalise=true``) arrives as a string."""
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def read_atoms(path: str | Path) -> dict[str, list[str]]:
    try:
        atoms = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"atoms file {path}: {e}") from None
    if not isinstance(atoms, dict) or not all(
            isinstance(q, list) and q and all(isinstance(x, str) for x in q) for q in atoms.values()):
        raise DataError(f"atoms file {path}: expected {{prompt: [yes/no question, ...]}} with at least one question "
                        "per prompt")
    return atoms


class JudgeBackbone(torch.nn.Module):
    """A VLM and its processor; ``prompt_format``: ``chat`` (the processor's chat template, a user turn with the
    image and the question), ``plain`` (the question as the processor's text, as PaliGemma is trained), or
    ``auto`` (chat when the processor has a template, plain for prefix-LM processors)."""

    def __init__(self, model, processor, prompt_format: str = "auto", name: str = "judge"):
        super().__init__()
        self.model, self.processor = model.eval(), processor
        has_chat = bool(getattr(processor, "chat_template", None))
        prefix_lm = "token_type_ids" in getattr(processor, "model_input_names", ())
        if prompt_format == "auto":
            prompt_format = "chat" if has_chat else "plain" if prefix_lm else ""
        if prompt_format not in ("chat", "plain") or (prompt_format == "chat" and not has_chat):
            raise DataError(f"judge model {name} has no chat template: set the reward argument prompt_format=plain "
                            "to pass the question as the processor's text, or use an instruction-tuned model")
        self.prompt_format = prompt_format

    def inputs(self, image, question: str) -> dict:
        if self.prompt_format == "chat":
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        else:
            text = question
        enc = self.processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in enc.items()}

    def token(self, answer: str) -> int:
        ids = self.processor.tokenizer.encode(answer, add_special_tokens=False)
        if not ids:
            raise DataError(f"the judge's tokenizer encodes {answer!r} to nothing")
        return ids[0]

    @torch.no_grad()
    def next_token_probs(self, image, question: str) -> Tensor:
        return torch.softmax(self.model(**self.inputs(image, question)).logits[0, -1].float(), dim=-1)


@REWARDS.register("vqascore")
class VQAScore(Reward):
    """VQAScore (Lin et al. 2024, arXiv 2404.01291, Eq. 1): P("Yes" | image, 'Does this figure show "{prompt}"?
    Please answer yes or no.') from a VLM judge (module docstring); ``atoms=FILE`` for several yes/no questions
    per prompt (mean), ``normalise=true`` for P(Yes) / (P(Yes) + P(No)), ``question=`` another template. Any
    ``AutoModelForImageTextToText`` + processor (default Qwen2-VL-7B-Instruct, one of t2v-metrics' judges; the
    paper's CLIP-FlanT5 is not a transformers class)."""

    needs_prompts = True
    default_model = "Qwen/Qwen2-VL-7B-Instruct"
    weights = "Qwen/Qwen2-VL-7B-Instruct (Apache-2.0) or any AutoModelForImageTextToText + processor via model="

    def __init__(self, backbone: JudgeBackbone, device=None, atoms=None, normalise=False, question: str = QUESTION,
                 answers: tuple[str, str] = ("Yes", "No")):
        super().__init__(backbone, device)
        self.atoms = read_atoms(atoms) if atoms else None
        self.normalise, self.question = _flag(normalise), question
        self.yes, self.no = backbone.token(answers[0]), backbone.token(answers[1])

    @classmethod
    def load(cls, model=None, device=None, prompt_format: str = "auto", **kw):
        from mmalign.vl.models import load_vlm  # lazy: the VLM wing loads only for a judge

        name = model or cls.default_model
        vlm, proc = load_vlm(name)
        return cls(JudgeBackbone(vlm, proc, prompt_format, name), device, **kw)

    @classmethod
    def tiny(cls, device=None, family: str = "paligemma", prompt_format: str = "auto", **kw):
        from mmalign.vl.models import tiny_vlm  # lazy: the VLM wing loads only for a judge

        vlm, proc = tiny_vlm(family)
        return cls(JudgeBackbone(vlm, proc, prompt_format, f"tiny {family}"), device, **kw)

    def questions(self, prompt: str) -> list[str]:
        if self.atoms is None:
            return [self.question.format(prompt)]
        if prompt not in self.atoms:
            raise DataError(f"the atoms file has no questions for the prompt {prompt!r} (it has "
                            f"{len(self.atoms)} prompts; keys must equal the prompts exactly)")
        return self.atoms[prompt]

    def _score(self, images, prompts, references):
        images = pil_images(images)
        out = []
        for image, prompt in zip(images, prompts):
            ps = []
            for q in self.questions(prompt):
                p = self.backbone.next_token_probs(image, q)
                ps.append(p[self.yes] / (p[self.yes] + p[self.no]) if self.normalise else p[self.yes])
            out.append(torch.stack(ps).mean())
        return torch.stack(out)
