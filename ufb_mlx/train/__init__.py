"""Training, the package that fine-tuning (``ufb_mlx.finetune``) and pretraining
(``ufb_mlx.pretrain``) share: optimizer and learning-rate schedule, the step (value and
gradient, gradient averaging across processes, clipping, update), progress logging,
atomic checkpoints and resuming.

Data parallelism uses MLX's own distributed layer: started with ``mlx.launch -n N python -m
ufb_mlx.finetune ...``, every process builds the same model from the same seed, draws the
same *global* batch (a pure function of the seed and the step) and trains on its own
contiguous slice of it; the losses are sums over the slice divided by the global count, and
``nn.average_gradients`` times N sums the slices' gradients, so N processes with batch b
compute the gradient that one process computes with batch N*b. Only rank 0 writes files
and prints.

Determinism: the data order is a function of (seed, epoch), the masks and the dropout of a
step are drawn from generators seeded by (seed, step[, rank]), and a checkpoint holds the
weights, the optimizer state (moments and step count) and the step. A run resumed from a
checkpoint therefore ends with exactly (bit for bit) the weights of an uninterrupted run.

Checkpoints: ``OUT/checkpoints/step-00000040/`` with ``model.safetensors``,
``optimizer.safetensors`` and ``trainer_state.json``; written into a temporary folder that is
renamed into place, so a killed run leaves only complete checkpoints. While the run goes on
the newest ``max(keep, 1)`` are kept (resuming needs one); once it has finished, the newest
``keep`` (none for 0). Ctrl-C lets the current step finish and saves a checkpoint there
(a second Ctrl-C stops at once).

Modules: ``world`` (the processes), ``options`` (run options, their validation and
fingerprint), ``optim`` (optimizer, schedule, initialisation), ``trainer`` (the step and the
loop), ``runlog`` (progress and log.jsonl), ``checkpoints``, ``runfolder`` (the output
folder, its lock and resuming). The library side only: the command-line layer
(``ufb_mlx.entry``) is not imported here.
"""

from .world import World  # noqa: F401
from .options import F32_MAX, F32_TINY, NOT_FINGERPRINTED, add_run_arguments, check_optimisation_args, check_resume, fingerprint  # noqa: F401
from .optim import SCHEDULES, init_model, init_normal, make_optimizer, make_schedule, no_weight_decay  # noqa: F401
from .runlog import LOG_FILE, Logger, peak_memory_gb, read_log  # noqa: F401
from .checkpoints import CHECKPOINTS, OPTIMIZER_FILE, STATE_FILE, _CKPT, _CKPT_TEMP, list_checkpoints, prune_checkpoints, recover_checkpoints, restore_checkpoint, save_checkpoint  # noqa: F401
from .runfolder import RUN_ENTRIES, RUN_FILES, check_batch_memory, check_out, check_out_path, check_training_memory, clean_stale_temporaries, lock_out, memory_limit, physical_memory, prepare_out, resume, tool_run  # noqa: F401
from .trainer import Interrupted, NonFiniteLoss, StopRequest, Trainer, all_finite, kept_after_stop, resume_hint, step_seed, train_loop  # noqa: F401
