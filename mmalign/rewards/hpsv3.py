"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score", arXiv 2508.03789, Sec. 3.2):
Qwen2-VL-7B-Instruct reads the image and an instruction that carries the prompt and ends in a ``<|Reward|>``
token; an MLP on that token's last hidden state gives (mu, sigma) of the uncertainty-aware ranking loss; the
score is mu.

Built here from transformers' ``Qwen2VLModel`` (vision tower + decoder, no language-model head: scoring never
reads it) and the released head (``nn.Sequential`` hidden -> 1024 -> ReLU -> 16 -> ReLU -> 2, kept in float32
as the package keeps it); the released checkpoint (``MizzenAI/HPSv3``: ``HPSv3.safetensors``, the full state
dict of the package's ``Qwen2VLRewardModelBT``) loads by renaming keys (``convert_official_state``).

Inference, as the ``hpsv3`` 1.0.0 package's ``HPSv3RewardInferencer`` runs it:
* each image resized (PIL bicubic) to the 28-multiple size of ``256 * 28 * 28`` pixels nearest its aspect ratio
  (``smart_resize`` with min = max pixels), then Qwen2-VL's own processor;
* one user turn: the image, then ``TEMPLATE`` with the prompt; the processor's chat template with the
  generation prompt; right padding;
* the decoder runs on 1-D positions (the package calls the text model with ``position_ids=None``, which is
  not Qwen2-VL's 3-D multimodal RoPE) -- kept, because the checkpoint was trained that way.
``tests/test_fidelity.py`` runs the package's own model class and inferencer under the transformers it pins
(4.45.2) and checks equal scores on the same random weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mmalign.data.records import DataError
from mmalign.paths import ASSETS, resolve

from .models import REWARDS, Reward, pil_images

Tensor = torch.Tensor
PIXELS = 256 * 28 * 28
REWARD_TOKEN = "<|Reward|>"
BASE = "Qwen/Qwen2-VL-7B-Instruct"
# The released model's input text, verbatim (its checkpoint was trained on exactly these tokens; the fidelity
# test compares token ids with the package's).
TEMPLATE = (
    '\n'
    'You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. \n'
    '\n'
    '**Visual Quality:**  \n'
    'Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n'
    '- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n'
    '- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.\n'
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n'
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n'
    '- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n'
    '\n'
    '**Text Alignment:**  \n'
    'Assess how well the image matches the textual prompt across the following sub-dimensions:\n'
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.\n'
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.\n'
    '- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.\n'
    '- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.\n'
    '- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.\n'
    'Textual prompt - {text_prompt}\n'
    '\n'
    '\n'
    '\n'
    'Please provide the overall ratings of this image: <|Reward|>\n'
    '\n'
    'END\n'
)


def reward_head(hidden: int) -> nn.Sequential:
    """The released ``ranknet`` head, index for index (``rm_head.0``, ``.3``, ``.5``): dropout is identity here."""
    return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


def convert_official_state(state: dict) -> tuple[dict, dict]:
    """The package's state dict (transformers-4.45 layout) -> (``Qwen2VLModel`` state, head state).
    ``visual.*`` stays, ``model.*`` is the decoder (``language_model.*``), ``lm_head`` is dropped."""
    body, head = {}, {}
    for k, v in state.items():
        if k.startswith("rm_head."):
            head[k[len("rm_head."):]] = v
        elif k.startswith("visual."):
            body[k] = v
        elif k.startswith("model."):
            body["language_model." + k[len("model."):]] = v
        elif not k.startswith("lm_head."):
            raise KeyError(f"unexpected key in an HPSv3 checkpoint: {k}")
    return body, head


def resize(image):
    """The package's image fetch: RGB, PIL bicubic to the 28-multiple size of PIXELS pixels."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, factor=28, min_pixels=PIXELS, max_pixels=PIXELS)
    return image.resize((w, h), resample=3)  # 3: bicubic


class HPSv3Backbone(nn.Module):
    """Qwen2-VL (``Qwen2VLModel``) + processor + the reward head; ``forward`` -> [N, 2] (mu, sigma)."""

    def __init__(self, vlm, processor, head: nn.Sequential):
        super().__init__()
        self.vlm, self.processor, self.head = vlm.eval(), processor, head.float().eval()
        tok = processor.tokenizer
        if REWARD_TOKEN not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_id = tok.convert_tokens_to_ids(REWARD_TOKEN)
        tok.padding_side = "right"

    def inputs(self, images, prompts) -> dict:
        turns = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEMPLATE.format(text_prompt=p)}]}]
                 for p in prompts]
        text = self.processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        enc = self.processor(text=text, images=[resize(im) for im in images], padding=True, return_tensors="pt")
        return {k: v.to(self.head[0].weight.device) for k, v in enc.items()}

    def forward(self, images, prompts) -> Tensor:
        enc = self.inputs(images, prompts)
        ids = enc["input_ids"]
        at_reward = ids == self.reward_id
        if not (at_reward.sum(1) == 1).all():
            raise DataError(f"HPSv3 needs exactly one {REWARD_TOKEN} token per input: a prompt contains it")
        emb = self.vlm.get_input_embeddings()(ids)
        feats = torch.cat(self.vlm.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output)
        at_image = (ids == self.vlm.config.image_token_id)[..., None].expand_as(emb)
        emb = emb.masked_scatter(at_image, feats.to(emb.dtype))
        hidden = self.vlm.language_model(inputs_embeds=emb, attention_mask=enc["attention_mask"]).last_hidden_state
        return self.head(hidden[at_reward].float())


def tiny_base(seed: int = 0):
    """A Qwen2-VL at test size over the tiny BPE vocabulary (``assets/tokenizers/tiny-qwen2vl``: Qwen2-VL's
    special tokens and a chat template of the same shape): (config kwargs in transformers 4.45's flat layout,
    which both 4.45 and 5 read; processor)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / "tiny-qwen2vl"), padding_side="right")
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template)
    ids = tok.convert_tokens_to_ids
    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": len(tok), "max_position_embeddings": 4096,
              "rope_theta": 10000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
              "image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
              "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>"),
              "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
              "pad_token_id": tok.pad_token_id, "tie_word_embeddings": False,
              "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2,
                                "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3}}
    return config, proc


def _checkpoint(model: str) -> Path:
    path = Path(resolve(model))
    if path.is_dir():
        path = path / "HPSv3.safetensors"
    if path.is_file():
        return path
    if model.endswith(".safetensors") or path.is_absolute() or model.startswith("."):
        raise DataError(f"hpsv3: no checkpoint at {model} (expected HPSv3.safetensors, or a folder or hub repo "
                        "holding it)")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model, "HPSv3.safetensors"))


@REWARDS.register("hpsv3")
class HPSv3(Reward):
    """HPSv3 (Ma et al. 2025, arXiv 2508.03789): Qwen2-VL-7B + a reward head at a ``<|Reward|>`` token, trained on
    1.17M human comparisons; score = mu of the predicted (mu, sigma) (module docstring). ``model=`` the released
    ``HPSv3.safetensors`` (or a folder / hub repo holding it), ``base=`` the Qwen2-VL config + processor it was
    built on; ``dtype=bfloat16`` as released (default: bfloat16 on CUDA, float32 on CPU)."""

    needs_prompts = True
    default_model = "MizzenAI/HPSv3"
    weights = "MizzenAI/HPSv3: HPSv3.safetensors (package MIT; weights: see the model card) on the Qwen/Qwen2-VL-7B-Instruct config and processor"

    @classmethod
    def load(cls, model=None, device=None, base: str = BASE, dtype: str | None = None, **kw):
        from accelerate import init_empty_weights
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoProcessor, Qwen2VLModel

        ckpt = _checkpoint(str(model or cls.default_model))
        config = AutoConfig.from_pretrained(resolve(base))
        processor = AutoProcessor.from_pretrained(resolve(base))
        body, head_state = convert_official_state(load_file(str(ckpt)))
        config.text_config.vocab_size = body["language_model.embed_tokens.weight"].shape[0]
        with init_empty_weights():  # parameters on the meta device, buffers (RoPE frequencies) real
            vlm = Qwen2VLModel(config)
        vlm.load_state_dict(body, strict=True, assign=True)
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        vlm.to(getattr(torch, dtype) if dtype else torch.bfloat16 if dev.type == "cuda" else torch.float32)
        head = reward_head(config.text_config.hidden_size)
        head.load_state_dict(head_state)
        return cls(HPSv3Backbone(vlm, processor, head), device)

    @classmethod
    def tiny(cls, device=None, seed: int = 0, **kw):
        from transformers import Qwen2VLConfig, Qwen2VLModel

        config, processor = tiny_base(seed)
        torch.manual_seed(seed)
        vlm = Qwen2VLModel(Qwen2VLConfig(**config))
        vlm.resize_token_embeddings(len(processor.tokenizer) + 1)  # + <|Reward|>, as the package adds it
        return cls(HPSv3Backbone(vlm, processor, reward_head(config["hidden_size"])), device)

    def _score(self, images, prompts, references):
        images = pil_images(images)
        return self.backbone(images, prompts)[:, 0]
