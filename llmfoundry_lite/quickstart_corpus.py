"""The quickstart corpus: docstrings of the Python standard library, split into train and val.

Every Python installation carries this text (real English technical prose), so the quickstart needs
no download. The corpus is deterministic for a given Python version: a fixed sorted list of modules
is walked in order, documents are deduplicated by exact text, and each document goes to `val` when a
stable hash of its text falls below `val_fraction` (so adding a module never reshuffles the others).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
from typing import Dict, Iterator, List

from llmfoundry_lite.files import atomic_write

# Importable everywhere without side effects (no GUI, no `this`/`antigravity`, no platform-only ones).
MODULES = sorted("""
abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmd code codecs
codeop collections colorsys compileall concurrent.futures configparser contextlib contextvars copy
copyreg csv dataclasses datetime decimal difflib dis doctest email email.message email.parser
enum filecmp fileinput fnmatch fractions ftplib functools gc getopt gettext glob graphlib gzip
hashlib heapq hmac html html.parser http http.client http.cookies http.server imaplib
importlib inspect io ipaddress itertools json json.decoder json.encoder keyword linecache locale
logging logging.handlers lzma mailbox math mimetypes modulefinder multiprocessing netrc numbers
operator optparse os os.path pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint
profile pstats py_compile pyclbr pydoc queue quopri random re reprlib rlcompleter runpy sched secrets
selectors shelve shlex shutil signal site smtplib socket socketserver sqlite3 ssl stat statistics
string stringprep struct subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap
threading timeit token tokenize tomllib trace traceback tracemalloc types typing unicodedata
unittest unittest.mock urllib.parse urllib.request uuid uu warnings wave weakref wsgiref xml.dom
xml.dom.minidom xml.etree.ElementTree xml.sax xmlrpc.client zipapp zipfile zipimport zlib zoneinfo
""".split())

MIN_CHARS = 40  # one-line stubs ("Return self==value.") teach little and repeat across classes


def _objects(module) -> Iterator[object]:
    """The module, then its own classes and functions in name order, each class followed by its methods."""
    yield module
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield obj
            for attr_name, attr in sorted(vars(obj).items()):
                if not attr_name.startswith("_") or attr_name == "__init__":
                    yield attr
        elif callable(obj):
            yield obj


def documents(modules: List[str] = MODULES) -> List[str]:
    """Deduplicated docstrings of `modules`, in a fixed order. Modules missing here are skipped."""
    seen: Dict[str, None] = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. a Python built without sqlite3 or lzma
            continue
        for obj in _objects(module):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                doc = inspect.cleandoc(doc).strip()
                if len(doc) >= MIN_CHARS:
                    seen.setdefault(doc, None)
    return list(seen)


def is_val(text: str, val_fraction: float) -> bool:
    """Stable split: the same text lands in the same split on every machine and every run."""
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def write_corpus(out_dir: str, val_fraction: float = 0.05, max_docs: int = 0) -> Dict[str, int]:
    """Write `train.jsonl`/`val.jsonl` (`{"text": ...}` per line) and `train.txt` (for the tokenizer), each
    atomically, so a present file is complete. `max_docs` > 0 keeps only the first documents (for quick
    tests). Returns counts per split and characters."""
    docs = documents()[:max_docs or None]
    splits: Dict[str, List[str]] = {"train": [], "val": []}
    for doc in docs:
        splits["val" if is_val(doc, val_fraction) else "train"].append(doc)
    os.makedirs(out_dir, exist_ok=True)
    for split, items in splits.items():
        with atomic_write(os.path.join(out_dir, f"{split}.jsonl"), encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in items)
    with atomic_write(os.path.join(out_dir, "train.txt"), encoding="utf-8") as f:
        f.write("\n\n".join(splits["train"]) + "\n")
    return {"train_docs": len(splits["train"]), "val_docs": len(splits["val"]),
            "chars": sum(len(d) for d in docs)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmfoundry_lite.quickstart_corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--max_docs", type=int, default=0, help="keep only the first N documents (0: all)")
    args = parser.parse_args(argv)
    counts = write_corpus(args.out_dir, args.val_fraction, args.max_docs)
    print(f"corpus: {counts['train_docs']} train and {counts['val_docs']} val documents, "
          f"{counts['chars']:,} characters -> {args.out_dir}")


if __name__ == "__main__":
    main()
