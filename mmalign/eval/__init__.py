"""Evaluation: what ``mmalign eval``, ``mmalign score``'s gallery, the demo and the online panel share.

    stats     bootstrap intervals, paired win rates, per-prompt diversity, FID / KID rows
    report    the printed table, thumbnails, the side-by-side gallery and the score gallery
    sampling  the one text-to-image sampling loop, sampled folders and their metadata.jsonl (resumable)
    folders   folders of sampled images paired by (prompt, seed), scored and reported

Nothing here imports the recipes (``mmalign.train``), the CLI or the demo (``tests/test_house.py``).
"""
