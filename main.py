"""Train and evaluate LAVT. ``python main.py`` alone runs the built-in demo (configs/demo.yaml).

    torchrun --nproc_per_node 4 main.py --dataset refcoco --refer_data_root <ROOT>      # the paper's recipe
    torchrun --nproc_per_node 4 main.py --cfg_file configs/swin_base_refcoco.yaml --resume
    torchrun --nproc_per_node 4 main.py --eval --type val testA testB --pretrain <file> ...

Wiring only: parse, build, hand over to the engine. A training writes into <OUTPUT>/<MODEL_ID>/, which it owns and
locks; an evaluation into the folder engine/run_folder.py chooses.
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # `python main.py`'s wall time counts from here, before the imports (torch: seconds)

from utils.openmp import set_spin_count  # noqa: E402 (imports no torch)

set_spin_count()  # before torch loads OpenMP (utils/openmp.py); GOMP_SPINCOUNT in the environment overrides it

import sys  # noqa: E402 (after the OpenMP setting)
from typing import Any  # noqa: E402

from yacs.config import CfgNode  # noqa: E402

from args import (  # noqa: E402
    check_flags,
    config_from_args,
    demo_hint,
    describe_batch,
    describe_config,
    names_run_folder,
    parse_args,
    rerun_hint,
)
from data import check_refer_files, load_refer  # noqa: E402
from data.checks import check_images  # noqa: E402
from data.image_io import ImageReadError  # noqa: E402
from data.synthetic_args import synthetic_sizes  # noqa: E402
from engine import NonFiniteLossError, load_pretrained, prepare_run_dir, run_evaluation, seed_everything, train  # noqa: E402
from engine.config_check import validate_config  # noqa: E402
from engine.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted  # noqa: E402
from engine.resume import ResumePlan, plan_resume  # noqa: E402
from engine.run_folder import RunFolder, run_dir_of, write_run_config  # noqa: E402
from engine.synthetic_once import ensure_synthetic_once  # noqa: E402
from engine.timing import report_timing  # noqa: E402
from models import CheckpointError, build_model  # noqa: E402
from models.text import load_tokenizer  # noqa: E402
from utils.allocator import keep_freed_memory  # noqa: E402
from utils.amp import amp_dtype, resolve_amp  # noqa: E402
from utils.atomic import StorageError  # noqa: E402
from utils.distributed import DistInfo, all_gather_object, barrier, cleanup, init_distributed_mode  # noqa: E402
from utils.errors import error_line, is_out_of_memory, is_worker_death  # noqa: E402
from utils.launcher import detect_launch  # noqa: E402
from utils.lock import RunLockedError  # noqa: E402
from utils.logger import setup_logging  # noqa: E402
from utils.machine import describe_machine  # noqa: E402
from utils.stopwatch import Stopwatch  # noqa: E402


def main(argv: list[str] | None = None, started: float | None = None) -> dict[str, Any]:
    """Run what ``argv`` asks; returns ``{"run_dir", "summaries", "best", "timing"}`` (the files are in the run
    folder). ``started``: when the process began (``time.monotonic``), for the wall time; default: now."""
    stopwatch = Stopwatch(started)
    args = parse_args(argv)
    cfg = config_from_args(args)
    validate_config(cfg)  # before anything is built or written
    check_flags(args, cfg)
    try:
        check_refer_files(cfg)
    except FileNotFoundError as e:
        raise type(e)(f"{e}{demo_hint(args)}") from e
    info = init_distributed_mode(args.device)
    try:
        return _run(args, cfg, info, stopwatch)
    finally:
        cleanup()


def _run(args: Any, cfg: CfgNode, info: DistInfo, stopwatch: Stopwatch) -> dict[str, Any]:
    amp_auto = cfg.TRAIN.AMP == "auto"
    # resolved before a resume compares the config with the checkpoint's (which stores it resolved)
    cfg.defrost()
    cfg.TRAIN.AMP = resolve_amp(cfg.TRAIN.AMP, info.device)
    cfg.freeze()
    # every resume check before anything is written: a refused resume leaves the run folder as it was
    resume = None if args.eval else plan_resume(
        args.resume, args.pretrain, cfg, info.world_size, run_dir_of(cfg), args.allow_change
    )  # fmt: skip
    # a training owns its folder (refused if it holds another run) and locks it until the end, crash included
    with prepare_run_dir(
        cfg, info, evaluate=args.pretrain if args.eval else None, named=names_run_folder(args),
        resume=bool(args.resume), overwrite=args.overwrite, stale_after_s=args.stale_lock_minutes * 60,
        hint=rerun_hint(args),
    ) as folder:  # fmt: skip
        return _run_in(args, cfg, info, folder, resume, amp_auto, stopwatch)


def _run_in(
    args: Any,
    cfg: CfgNode,
    info: DistInfo,
    folder: RunFolder,
    resume: ResumePlan | None,
    amp_auto: bool,
    stopwatch: Stopwatch,
) -> dict[str, Any]:
    run_dir = folder.path
    logger = setup_logging(run_dir / "log.txt", info.rank)
    logger.info("config: %s", describe_config(args))
    logger.info("machine: %s", describe_machine(info.device))
    stopwatch.lap("start-up")  # imports, parsing and checks, the run folder
    logger.info(keep_freed_memory())  # before the data, the model and their tensors are built
    for warning in folder.warnings:
        logger.warning(warning)
    if amp_auto:
        logger.info("TRAIN.AMP auto -> %s on %s", cfg.TRAIN.AMP or "float32", info.device)
    if args.resume == "auto" and resume is None:
        logger.info("--resume auto: no %s yet, starting fresh", run_dir / "last.pth")
    logger.info(
        "run folder %s (%s), %d process(es) on %s; %s",
        run_dir, folder.reason, info.world_size, info.device, info.launcher,
    )  # fmt: skip
    if not args.eval:
        logger.info(describe_batch(cfg.TRAIN.BATCH_SIZE, info.world_size))
    # (a full disk: one StorageError line, no half config); the results name it
    config_file = run_dir / all_gather_object(
        write_run_config(run_dir, cfg.dump(), evaluation=args.eval).name if info.rank == 0 else None
    )[0]  # fmt: skip
    logger.info("full config written to %s", config_file)
    seed_everything(cfg.TRAIN.SEED + info.rank)
    if cfg.DATA.DATASET == "synthetic":
        if info.rank == 0:
            sizes = synthetic_sizes(cfg.DATA.SYNTHETIC_IMAGES, cfg.DATA.SYNTHETIC_EVAL_IMAGES)
            ensure_synthetic_once(cfg.DATA.ROOT, **sizes)  # (waiting for another run making it)
        barrier()
        stopwatch.lap("synthetic data")  # generated, or found complete
    refer = load_refer(cfg)  # the annotations, read once for the image check, training and evaluation
    if info.rank == 0:  # every image the run will read, checked before the first step (headers, cached)
        after = list(cfg.EVAL.SPLITS) if cfg.EVAL.AFTER_TRAIN else []
        splits = list(dict.fromkeys(list(cfg.EVAL.SPLITS) if args.eval else ["train", "val", *after]))
        checked = check_images(refer, splits, cache_file=run_dir / ".image_check.json")
        logger.info("%d images of %s checked in %.1fs", checked.checked, ", ".join(splits), checked.seconds)
    barrier()
    tokenizer = load_tokenizer(cfg.MODEL.TEXT.ENCODER)

    # a full LAVT checkpoint replaces every weight: skip loading the pretrained parts first
    pretrained = not (args.eval or resume or args.pretrain)
    model = build_model(cfg, pretrained, device=info.device, dtype=amp_dtype(cfg.TRAIN.AMP))
    stopwatch.lap("loading")  # annotations, image checks, tokenizer, model
    out: dict[str, Any] = {"run_dir": str(run_dir)}
    if args.eval:
        load_pretrained(model, args.pretrain, cfg)
        out["summaries"] = run_evaluation(cfg, model, tokenizer, info, run_dir, args.pretrain, refer, config_file.name)
        stopwatch.lap("evaluation")
    else:
        result = train(cfg, args, model, tokenizer, info, run_dir, refer, resume=resume, stopwatch=stopwatch)
        out["best"] = result["best"]
        if result["finished"] and cfg.EVAL.AFTER_TRAIN:
            best_path = run_dir / "best.pth"
            load_pretrained(result["model_without_ddp"], str(best_path), cfg)
            model = result["model_without_ddp"]
            out["summaries"] = run_evaluation(
                cfg, model, tokenizer, info, run_dir, str(best_path), refer, config_file.name
            )
            stopwatch.lap("final evaluation")
    out["timing"] = report_timing(stopwatch, cfg, info, run_dir, "evaluation" if args.eval else "training")
    return out


# What a user can get wrong (data, checkpoint, config, flags): one line and exit status 2. Anything else is a bug and
# keeps its traceback; --debug shows the traceback for everything.
USER_ERRORS = (
    ValueError, FileNotFoundError, PermissionError, ImageReadError, CheckpointError, NonFiniteLossError, RunLockedError,
)  # fmt: skip


def _is_first_rank() -> bool:
    """Whether this process speaks for the group: rank 0 under torchrun or srun (SLURM_PROCID), or alone. Read from
    the environment, since the error may come before (or from) forming the group."""
    try:
        return detect_launch().rank == 0
    except ValueError:  # inconsistent launch variables: every process says so
        return True


def cli(argv: list[str] | None = None, started: float | None = None) -> int:
    """``main`` for the command line: returns the exit status (0; 2 after a one-line error from rank 0;
    ``EXIT_PREEMPTED`` after a stop request, ``EXIT_INTERRUPTED`` after Ctrl-C, with one line saying where the
    checkpoint is; 1 after the one line of a DataLoader worker that died, or of memory run out)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        main(argv, started)
    except Preempted as e:
        if _is_first_rank():
            print(f"main.py: {'interrupted' if e.interrupted else 'preempted'}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED if e.interrupted else EXIT_PREEMPTED
    except KeyboardInterrupt:  # Ctrl-C outside training's iterations, or twice
        if debug:
            raise
        if _is_first_rank():
            print("main.py: interrupted (Ctrl-C); a training continues from its last checkpoint with --resume auto",
                  file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    except (*USER_ERRORS, StorageError) as e:
        if debug:
            raise
        if _is_first_rank():
            # (a full disk: once there is room, a training goes on from the checkpoint it last wrote)
            resume = "; a training continues from its last checkpoint with --resume auto"
            print(error_line("main.py", e) + (resume if isinstance(e, StorageError) else ""), file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:
        if is_worker_death(e):
            advice = ("A data loader process died: most often the out-of-memory killer (fewer DATA.WORKERS or a "
                      "smaller batch need less memory)")
        elif is_out_of_memory(e):
            advice = ("Out of memory: a smaller batch (--batch_size, or --eval_batch_size), --grad_checkpoint or "
                      "--amp bf16 need less")
        else:
            raise
        if debug:
            raise
        # said by the process that met it, whichever rank it is
        advice += "; a training continues from its last checkpoint with --resume auto"
        said = error_line("main.py", e).rstrip()  # "... is killed by signal: Killed. " or "... exited unexpectedly"
        print(f"{said}{'' if said.endswith('.') else '.'} {advice}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli(started=_STARTED))
