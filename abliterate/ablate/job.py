"""The ablation job: stream a checkpoint shard by shard into a new, edited model folder.

Safety and atomicity:
- everything that can be checked is checked before the first byte is written (plan, model, shards, index,
  the measurement file's shape, output location, free space), except the measured values themselves, which are
  read once torch has loaded: untouched tensors are copied meanwhile, and bad values remove that copy again;
- work goes to `<output>.partial/`; each finished shard is renamed into place there and gets a completion marker
  holding a hash of (input shard identity, plan, measurement file, mode, device type); a rerun reuses shards
  whose marker matches and redoes the rest;
- the last step renames the partial folder to the output, so a folder at the output path is always complete,
  and a run killed anywhere and rerun gives the same bytes as one that never stopped.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from abliterate.cli import UserError
from abliterate.startup import bound_heap_growth, prepare_progress_bars
from abliterate.ablate.preflight import (check_device_name, check_free_space, check_output_location, pick_device,
                                        space_error)
from abliterate.ablate.second_pass import check_second_pass_file, loaded_second_pass
from abliterate.ablate.resume import MARKER_DIR, clean_partial, seal_shard, shard_done, shard_key, sync_file
from abliterate.ablate.tensor_edits import bind_edits, keeps_layout, plan_tensor_edits
from abliterate.ablate.warnings import directions_projected, emit, measurement_warnings, plan_warnings
from abliterate.measure.measurement_file import (final_norm_in_file, load_measurements, measurement_contents,
                                                 measurement_metadata, measurement_shape)
from abliterate.ablate.model_folder import INDEX_NAME, ModelFolder, open_model_folder, resolve_model_path
from abliterate.ablate.plan import Plan
from abliterate.ablate.plan_checks import check_plan_against, check_plan_contents, check_plan_shapes
from abliterate.ablate.record import RECORD_NAME, build_record, file_sha256, model_card, record_bytes
from abliterate.ablate.safetensors_io import POSITIONAL_IO, copy_range, layout_unchanged, write_safetensors

# Before the command starts torch's background import: any import during phases 1-2 would wait behind it.
prepare_progress_bars()

CRASH_ENV = "ABLITERATE_TEST_CRASH_AFTER"  # test-only: "N[:kill|:enospc]" crashes after N output tensors


@dataclass
class Summary:
    output: Path
    counts_by_role: dict
    layers: list[int]
    bytes_written: int = 0
    shards_reused: int = 0
    shards_written: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    rows: list = field(default_factory=list)  # dry-run: (key, role, group, axis, shard)
    mxfp4: dict | None = None
    types: dict | None = None  # GGUF: tensor name -> "TYPE" or "TYPE -> Q8_0" (dry-run and verbose listings)
    notes: list = field(default_factory=list)  # extra summary lines (GGUF: residual after re-encoding, fallbacks)
    passes: dict | None = None  # a two-pass plan: tensor key -> "1", "2" or "1+2"
    pass_layers: tuple | None = None  # a two-pass plan: (layers of pass 1, layers of pass 2)


def run_ablation(plan: Plan, device: str | None = None, force: bool = False, dry_run: bool = False,
                 verbose: bool = False, progress: bool = True, early_copy: bool = True) -> Summary:
    """Validate everything, then write the edited model folder at plan.output (or only list edits on dry_run).
    A plan whose model is a GGUF file goes to abliterate.ablate.gguf_job instead (GGUF in, GGUF out).

    Three phases. 1: everything the headers can tell (model folder, shards, index, the measurement file's shape,
    plan ranges, which tensors are edited, output location, free space) is checked without a tensor library.
    2 (fresh runs, `early_copy`): each shard's header and untouched tensors are copied to their final offsets,
    while torch loads on a background thread (abliterate.startup). 3: the measured values are checked
    (finite, usable directions), the edits get their directions and every edited tensor is written; each shard
    is then made durable, renamed and marked done. Bad input found in phase 3 removes what phase 2 wrote, so a
    failed run leaves nothing behind either way.
    """
    if is_gguf_model(plan.model) and plan.second_pass is not None:
        raise UserError(f"{plan.source}: second_pass is not available for GGUF models (each pass would re-encode the "
                        "quantized tensors in between, so the composition would not be exact); ablate the HF "
                        "checkpoint, or run the two passes as two plans")
    if is_gguf_model(plan.model):
        from abliterate.ablate.gguf_job import run_gguf_ablation

        return run_gguf_ablation(plan, device=device, force=force, dry_run=dry_run, progress=progress)
    start = time.monotonic()
    root = resolve_model_path(plan.model, plan.source)
    folder = open_model_folder(root)
    shape = measurement_shape(plan.measurements)
    if shape is not None:
        check_plan_shapes(plan, *shape, folder.num_layers, folder.hidden_size, final_norm_in_file(plan.measurements))
    contents = measurement_contents(plan.measurements)
    if contents is not None:  # token positions and direction sets the file cannot give: before any byte is copied
        check_plan_contents(plan, *contents)
    if plan.second_pass is not None:
        check_second_pass_file(plan, folder.num_layers, folder.hidden_size)
    check_device_name(device)
    work = plan_tensor_edits(folder, plan)
    header_meta = measurement_metadata(plan.measurements)
    emit(plan_warnings(plan, folder, work, header_meta))
    second_meta = measurement_metadata(plan.second_pass.measurements) if plan.second_pass is not None else None
    if second_meta is not None:
        emit(measurement_warnings(plan.second_pass, second_meta))
    output = plan.output.resolve()
    partial = output.with_name(output.name + ".partial")
    fresh = not dry_run and not partial.exists()
    if not dry_run:
        check_output_location(root, plan.output, force)
    if fresh:
        check_free_space(folder, work, output)
    # A device other than the CPU needs torch to check, and a run that cannot use it must stop before the first
    # byte is copied: that check waits for torch here (with no --device or --device cpu nothing waits).
    dev = pick_device(device) if device is not None and device != "cpu" else None
    crash = _CrashHook.from_env()
    early: dict[str, set[str]] = {}  # shard name -> the tensors phase 2 wrote
    # One background thread makes written data durable, in submission order: phase 2's shards (started early, so
    # the disk works while torch loads and the edits run) and every finished shard (then renamed and marked).
    disk = ThreadPoolExecutor(max_workers=1)
    syncing: list = []
    try:
        try:
            if fresh and early_copy and shape is not None and POSITIONAL_IO:
                partial.mkdir(parents=True)
                early = _copy_untouched(folder, work, partial, crash, progress,
                                        [n for n in folder.shards if keeps_layout(work.edits.get(n, {}))],
                                        disk, syncing)
            directions, dev, projected, second = _bind(plan, folder, work, device, dev, header_meta is None,
                                                       second_meta is None)
        except (UserError, OSError) as exc:
            # Bad input found after phase 2 wrote, or no space: nothing in a fresh partial folder is finished work
            # yet, so the failed run leaves nothing behind. (A crash or kill leaves it; the next run cleans it up.)
            _settle(syncing)
            error = space_error(exc, partial) if isinstance(exc, OSError) else exc
            if fresh and error is not None and partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
            raise error or exc
        summary = Summary(plan.output, work.counts_by_role, sorted(work.layers), rows=work.rows, dry_run=dry_run,
                          mxfp4=({"mode": work.mxfp4_mode} if work.mxfp4_mode else None), passes=work.passes,
                          pass_layers=(None if work.passes is None else
                                       (sorted(work.first_layers), sorted(work.second_layers))))
        if not dry_run:
            _write_shards(plan, folder, work, directions, dev, partial, early, force, crash, progress, summary,
                          disk, syncing, projected, second)
            summary.mxfp4 = work.mxfp4_report() if work.mxfp4_mode else None
    finally:
        disk.shutdown(wait=True)
    summary.seconds = time.monotonic() - start
    return summary


def _copy_untouched(folder: ModelFolder, work, partial: Path, crash: "_CrashHook", progress: bool,
                    shards: list[str], disk: ThreadPoolExecutor, syncing: list) -> dict[str, set[str]]:
    """Phase 2: for each shard whose layout the edit keeps, write its header and every tensor it does not edit
    at their final offsets in `<shard>.tmp` (kernel copies, which release the GIL while torch imports). The edited
    tensors' bytes are filled in later at their own offsets. Returns, per shard, the tensors written."""
    untouched = {name: [t for t in folder.headers[name].tensors if t.name not in work.edits.get(name, {})]
                 for name in shards}
    bar = tqdm(total=sum(t.nbytes for ts in untouched.values() for t in ts), desc="untouched tensors", unit="B",
               unit_scale=True, disable=not progress, file=sys.stderr)
    written: dict[str, set[str]] = {}
    for name in shards:
        header = folder.headers[name]
        tmp = partial / (name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.root / name, "rb") as src, open(tmp, "wb") as dst:
            dst.write(header.header_bytes)
            for info in sorted(untouched[name], key=lambda t: t.begin):
                dst.seek(info.begin)  # the output keeps the input's layout: same offset
                copy_range(src, dst, info.begin, info.nbytes)
                bar.update(info.nbytes)
                crash.tick()
        written[name] = {t.name for t in untouched[name]}
        # Without this, nothing reaches the disk before each shard's final fsync (under the kernel's dirty-memory
        # limits), and the last one then waits for a whole shard: 0.1-0.2 s of a 2 GB run.
        syncing.append(disk.submit(sync_file, tmp, True))
    bar.close()
    return written


def _bind(plan: Plan, folder: ModelFolder, work, device: str | None, dev, warn_metadata: bool,
          warn_second_metadata: bool = False):
    """Phase 3's checks: load the measured values, check them (finite, usable directions), bind the edits.
    Returns the prepared directions, the device (`dev` when already checked, else picked from `device`),
    whether those directions are projected, and for a two-pass plan the second pass's SecondPass (else None).
    `warn_metadata`: the file's metadata was not in a header (a .pt file), so its warnings are given now."""
    measurements = load_measurements(plan.measurements)
    if warn_metadata:
        emit(measurement_warnings(plan, measurements.metadata))
    directions = check_plan_against(plan, measurements, folder.num_layers, folder.hidden_size)
    second = None
    if plan.second_pass is not None:
        meas2, directions2 = loaded_second_pass(plan, folder.num_layers, folder.hidden_size)
        if warn_second_metadata:
            emit(measurement_warnings(plan.second_pass, meas2.metadata))
        second = SecondPass(directions2, directions_projected(plan.second_pass, meas2.metadata))
    dev = dev if dev is not None else pick_device(device)
    bind_edits(work, folder, plan, directions, dev, second.directions if second is not None else None)
    return directions, dev, directions_projected(plan, measurements.metadata), second


@dataclass
class SecondPass:
    """What the record needs of a plan's second pass, once its measurements are loaded."""

    directions: dict
    projected: bool
    sha256: str = ""


def _write_shards(plan: Plan, folder: ModelFolder, work, directions, dev, partial: Path,
                  early: dict[str, set[str]], force: bool, crash: "_CrashHook", progress: bool,
                  summary: Summary, disk: ThreadPoolExecutor, syncing: list, projected: bool,
                  second: SecondPass | None = None) -> None:
    """Phase 3's writing: every shard's edited tensors (and, for shards phase 2 did not start, everything else),
    then the other files, then the rename into place."""
    import torch

    from abliterate.ablate.shard_writer import Buffers, WriteContext, shard_layout

    output = plan.output.resolve()
    meas_sha = file_sha256(plan.measurements)
    key_sha = meas_sha
    if second is not None:  # both files determine the bytes (the plan's record names the second file's path only)
        second.sha256 = file_sha256(plan.second_pass.measurements)
        key_sha = f"{meas_sha}+{second.sha256}"
    keys = {name: shard_key(folder, name, plan, key_sha, dev.type) for name in folder.shards}
    done: set[str] = set()
    if not early:
        done = {name for name in folder.shards if shard_done(partial, name, keys[name])}
        check_free_space(folder, work, output, done)
        partial.mkdir(parents=True, exist_ok=True)
        clean_partial(partial, done)

    torch.backends.cuda.matmul.allow_tf32 = False  # edits in true float32
    bound_heap_growth()
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # Up to three threads here move bytes (untouched copies, edited writes, fsync); the edit's own threads
        # spin-waiting beside them made the edits take 1.6x as long on 2 cores. Leave them two cores.
        torch.set_num_threads(max(1, threads - 2))
    (partial / MARKER_DIR).mkdir(exist_ok=True)
    buffers = Buffers()  # shared by every shard: edited tensors are written one at a time
    # A finished shard is made durable (fsync), renamed into place and marked done by the background thread while
    # the next shard is written: its write-back to disk overlaps the next shard's copying, as it does for `cp`.
    try:
        bar = tqdm(folder.shards, desc="shards", unit="shard", disable=not progress, file=sys.stderr)
        for name in bar:
            if name in done:
                summary.shards_reused += 1
                continue
            header = folder.headers[name]
            already = early.get(name, set())
            tmp = partial / (name + ".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tensor_bar = tqdm(total=len(header.tensors) - len(already), desc=Path(name).name, unit="tensor",
                              leave=False, disable=not progress, file=sys.stderr)

            def tensor_done(_name: str, _bar=tensor_bar) -> None:
                _bar.update(1)
                crash.tick()

            # A shard phase 2 started is completed in place ("r+b" keeps its bytes); any other starts afresh.
            with open(folder.root / name, "rb") as src, open(tmp, "r+b" if name in early else "wb") as dst:
                ctx = WriteContext(src, dev, tensor_done, buffers)
                tensors = shard_layout(header, work.edits.get(name, {}), ctx)
                verbatim = header.header_bytes if layout_unchanged(header, tensors) else None
                if name in early and verbatim is None:
                    raise RuntimeError(f"internal error: {name} was copied early but its layout changes")
                summary.bytes_written += write_safetensors(dst, tensors, header.metadata, verbatim, skip=already)
            tensor_bar.close()
            syncing.append(disk.submit(seal_shard, tmp, partial, name, keys[name]))
            if crash.armed:  # fault injection: a shard counts as written once sealed, so where a kill lands is exact
                syncing[-1].result()
            summary.shards_written += 1
            crash.tick()
        for f in syncing:
            f.result()
        _finish_folder(folder, plan, partial, work, directions, meas_sha, dev.type, projected, second)
        crash.tick()
        _move_into_place(partial, output, force)
    except OSError as exc:
        _settle(syncing)
        for name in folder.shards:  # unfinished shards (the current one, others phase 2 started) free their space
            (partial / (name + ".tmp")).unlink(missing_ok=True)
        raise space_error(exc, partial) or exc
    finally:
        torch.set_num_threads(threads)


def _finish_folder(folder: ModelFolder, plan: Plan, partial: Path, work, directions, meas_sha: str,
                   device_type: str, projected: bool, second: SecondPass | None = None) -> None:
    """Copy the other files, write the index, config changes, abliteration.json and README into `partial`."""
    for rel in folder.other_files:
        dst = partial / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel == "config.json" and work.config_override is not None:
            dst.write_bytes(work.config_override)
        elif rel == "README.md":
            continue  # replaced by our model card (the base card is kept as README.base.md)
        else:
            shutil.copyfile(folder.root / rel, dst)
    if "README.md" in folder.other_files:
        shutil.copyfile(folder.root / "README.md", partial / "README.base.md")
    if folder.index is not None:
        if work.index_override is not None:
            (partial / INDEX_NAME).write_bytes(work.index_override)
        else:
            shutil.copyfile(folder.root / INDEX_NAME, partial / INDEX_NAME)
    rec = build_record(plan, folder.model_type, meas_sha, directions, work.counts_by_role, sorted(work.layers),
                       device_type, work.mxfp4_report() if work.mxfp4_mode else None, directions_projected=projected,
                       second_pass=(None if second is None else
                                    (second.sha256, second.directions, second.projected,
                                     sorted(work.first_layers), sorted(work.second_layers))))
    (partial / RECORD_NAME).write_bytes(record_bytes(rec))
    (partial / "README.md").write_bytes(model_card(plan, rec))
    shutil.rmtree(partial / MARKER_DIR)


def _move_into_place(partial: Path, output: Path, force: bool) -> None:
    """Rename the finished folder to the output path (replacing an old output only with --force)."""
    if output.exists():
        if not force and any(output.iterdir()):
            raise UserError(f"output {output} appeared while this run was working; pass --force to replace it")
        old = output.with_name(output.name + f".old-{os.getpid()}")
        os.replace(output, old)
        os.replace(partial, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, output)


def _settle(futures: list) -> None:
    """Wait for background syncing and sealing after an error elsewhere; their errors matter less than that one."""
    for f in futures:
        try:
            f.result()
        except Exception:  # noqa: BLE001 - the error being handled is reported instead
            pass


def is_gguf_model(model: str) -> bool:
    """A plan whose model is a .gguf file (or a split set's first part) goes to the GGUF job."""
    return str(model).lower().endswith(".gguf")


class _CrashHook:
    """Test-only fault injection: after N ticks (output tensors, shard and folder steps) stop the run abruptly."""

    def __init__(self, after: int | None, mode: str):
        self.after, self.mode, self.count = after, mode, 0

    @classmethod
    def from_env(cls) -> "_CrashHook":
        raw = os.environ.get(CRASH_ENV)
        if not raw:
            return cls(None, "")
        n, _, mode = raw.partition(":")
        return cls(int(n), mode or "raise")

    @property
    def armed(self) -> bool:
        return self.after is not None

    def tick(self) -> None:
        if self.after is None:
            return
        self.count += 1
        if self.count < self.after:
            return
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        raise RuntimeError(f"injected crash after {self.count} steps ({CRASH_ENV})")
