"""Times Hugging Face's BertForMaskedLM for ``python -m ufb_mlx.benchmark model``.

Run by the benchmark as a separate process (``PYTHON ufb_mlx/hf_bert_worker.py``, any
Python with torch and transformers: it imports nothing of this project), so that torch's
OpenMP/MKL threads and MLX's OpenBLAS never share a process. The benchmark sends one
command per line on stdin and reads one JSON object per line on stdout:

    {"cmd": "setup", "batch": B, "seq": S}  -> {"ok": true, "threads": n, "probe_ms": {...}}
    {"cmd": "run"}                          -> {"seconds": t}   (one timed forward)
    {"cmd": "quit"}

The model is bert-base (BertConfig's defaults: 12 layers, hidden 768, 12 heads, FFN 3072,
vocabulary 30522) with random weights, in float32, eval mode, under inference_mode: the
full MLM forward, logits for every position. torch's thread count is the faster of 1 and
2 (measured at set-up): on small VMs 2 OpenMP threads can be several times slower.
"""

import json
import os
import sys
import time

# Run by path, this file's folder (ufb_mlx/) comes first on sys.path, where its modules
# (data.py, metrics.py, model.py, ...) would shadow installed packages of the same name.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)


def main() -> int:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig()).eval()
    ids = mask = None

    def forward():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).logits

    def timed(reps):
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            forward()
            best = min(best, time.perf_counter() - t0)
        return best

    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "setup":
            g = torch.Generator().manual_seed(msg["batch"])
            ids = torch.randint(5, model.config.vocab_size, (msg["batch"], msg["seq"]), generator=g)
            mask = torch.ones_like(ids)
            probe = {}
            for n in (1, 2):
                torch.set_num_threads(n)
                forward()
                probe[n] = timed(2)
            best = min(probe, key=probe.get)
            torch.set_num_threads(best)
            reply = {"ok": True, "threads": best, "probe_ms": {k: v * 1e3 for k, v in probe.items()},
                     "torch": torch.__version__}
        elif msg["cmd"] == "run":
            t0 = time.perf_counter()
            forward()
            reply = {"seconds": time.perf_counter() - t0}
        else:
            return 0
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
