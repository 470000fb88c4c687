"""Train the tiny byte-level BPE tokenizers shipped in assets/tokenizers/ (offline, deterministic).

Byte-level, so they encode any text; merges are learned on the toy text-preference set, the
shapes-world prompts and captions, and a little generic English. Two variants of one vocabulary:

  tiny-bpe       plain (no special tokens added): the causal-LM tokenizer
  tiny-clip-bpe  CLIP-style: <|startoftext|> text <|endoftext|>, padded to 16 tokens -- the text-encoder
                 tokenizer of the tiny diffusion pipelines (pooled output = the EOS position)
  tiny-t5-bpe    T5-style: text </s> (here <|endoftext|>), no BOS -- the T5 tokenizer of the tiny SD3 / Flux
                 pipelines (``--t5-only`` derives it from an existing tiny-bpe without retraining)

Load with ``AutoTokenizer.from_pretrained("assets/tokenizers/tiny-bpe")``.

    python scripts/build_tiny_tokenizer.py
"""
import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mmalign.toyworld.world import COLORS, SHAPES

GENERIC = """a an the of and or in on at to with for from by is are was were be this that these those it
there here one two three four five six small large big tiny left right top bottom center middle picture image
photo of showing shape object background dark light color colour please thanks yes no what which where how
question answer describe tell me about think honestly also very quite really not good bad""".split()


def corpus(root: Path):
    for f in sorted((root / "assets/data/toy_prefs").glob("*.jsonl")):
        for line in open(f):
            r = json.loads(line)
            for v in r.values():
                if isinstance(v, str):
                    yield v
                elif isinstance(v, list):
                    yield from (x for x in v if isinstance(x, str))
    for c in COLORS:
        for s in SHAPES:
            for tmpl in ("a {c} {s}", "A {c} {s}.", "a picture of a {c} {s}", "a {s} that is {c}",
                         "a small {c} {s} on a dark background", "a large {c} {s} in the center"):
                yield tmpl.format(c=c, s=s)
    yield " ".join(GENERIC)


def t5_variant(base: Path, out: Path):
    """The tiny-bpe vocabulary with T5's special-token layout: ``text </s>``, padded with <pad>."""
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)])
    t5 = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                 pad_token="<pad>", model_max_length=32)
    t5.save_pretrained(out)
    print(f"saved T5-style variant to {out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="assets/tokenizers/tiny-bpe")
    ap.add_argument("--vocab-size", type=int, default=768)
    ap.add_argument("--t5-only", action="store_true", help="only derive tiny-t5-bpe from the existing tiny-bpe")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    if args.t5_only:
        t5_variant(root / args.out, root / args.out.replace("tiny-bpe", "tiny-t5-bpe"))
        return
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<|endoftext|>", "<pad>", "<|startoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus(root)) * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<pad>", model_max_length=77)
    out = root / args.out
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    print(f"saved tokenizer with {len(fast)} tokens to {out}")
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    clip = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<pad>", model_max_length=16)
    out_clip = out.parent / "tiny-clip-bpe"
    clip.save_pretrained(out_clip)
    print(f"saved CLIP-style variant to {out_clip}")
    t5_variant(out, out.parent / "tiny-t5-bpe")


if __name__ == "__main__":
    main()
