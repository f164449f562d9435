"""Convert OpenAI CLIP's BPE vocabulary, as shipped in the open-clip-torch wheel
(``open_clip/bpe_simple_vocab_16e6.txt.gz``, MIT), into the ``vocab.json`` + ``merges.txt`` that
``transformers.CLIPTokenizer`` loads. The ids are OpenAI's: the vocabulary is built exactly as in
CLIP's ``simple_tokenizer.py`` (256 byte symbols, the same with ``</w>``, one entry per merge,
then the two special tokens). Run once; the output is committed under cns/assets/clip_tokenizer.

    pip install --no-deps open-clip-torch && python scripts/convert_clip_vocab.py
"""

import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable character map of GPT-2/CLIP's byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main(out_dir: str = "cns/assets/clip_tokenizer") -> None:
    import importlib.util

    # find_spec, not import: open_clip's __init__ imports torchvision, which this project avoids.
    (package_dir,) = importlib.util.find_spec("open_clip").submodule_search_locations
    src = Path(package_dir) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {out}/vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges)")


if __name__ == "__main__":
    main(*sys.argv[1:])
