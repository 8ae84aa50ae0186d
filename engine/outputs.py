"""Where a run writes: a folder of its own, never another run's, created only once the run starts.

Without ``--output_dir`` every run gets ``output/<time>_<arch>_<method>_k<tokens>``, and ``output/latest``
points to the newest run that holds checkpoints (a training run: evaluations and benchmarks write none, so
they leave it where it is and ``--checkpoint output/latest/best.pt`` keeps working); an explicit folder holding another run's files is refused (unless ``--overwrite``);
``--resume`` continues in the checkpoint's own folder. A run that fails before writing a checkpoint or
results leaves the disk as it found it.
"""
import os
import re
import time
from typing import Any, List, Optional, Sequence, Tuple

from . import distributed
from .checkpoint import write_text_atomic
from .distributed import Processes
from .errors import CLIError

OUTPUT_ROOT = "output"  # without --output_dir every run gets a folder of its own here
LATEST = "latest"  # OUTPUT_ROOT/LATEST: the newest run that holds checkpoints


# The files that make a folder a run's: an explicit --output_dir holding any of them is refused (unless
# --overwrite, or --resume continues the run they belong to).
RUN_FILES = ("results.json", "config.yaml", "last.pt", "best.pt", "log.jsonl")
PRODUCTS = ("last.pt", "best.pt", "results.json", "log.jsonl")  # what a run writes once it has got somewhere
OVERWRITTEN = RUN_FILES + ("visualization.png",)  # what --overwrite removes before the run starts


def _missing_dirs(path: str) -> List[str]:
    """``path`` and those of its ancestors that do not exist yet, innermost first."""
    missing, current = [], os.path.abspath(path)
    while not os.path.lexists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return missing


def _remove_dirs(dirs: Sequence[str]) -> None:
    """Remove the folders ``dirs`` (innermost first) while they are empty."""
    for folder in dirs:
        try:
            os.rmdir(folder)
        except OSError:
            return


def _cannot_write(path: str, err: OSError) -> CLIError:
    return CLIError(f"--output_dir: cannot write to {path} ({err.strerror or err}); choose another folder")


def check_output_dir(path: str) -> None:
    """Check that ``path`` can be created and written to (before any data or weights are read), leaving
    nothing behind: the folder is only created when the run starts training or evaluating."""
    created = _missing_dirs(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise _cannot_write(path, err) from None
    finally:
        _remove_dirs(created)


def files_of_a_run(path: str) -> List[str]:
    """The files of :data:`RUN_FILES` that ``path`` holds."""
    return [name for name in RUN_FILES if os.path.isfile(os.path.join(path, name))]


def refuse_another_run(path: str) -> None:
    """An explicit --output_dir that holds another run's files is never silently reused."""
    found = files_of_a_run(path)
    if not found:
        return
    resume = f"continue that run with --resume {os.path.join(path, 'last.pt')}, " if "last.pt" in found else ""
    raise CLIError(f"--output_dir {path} already holds another run's files ({', '.join(found)}); {resume}choose "
                   f"another folder (or drop --output_dir: every run gets a new folder under output/), or add "
                   f"--overwrite to replace them")


class RunFolder:
    """The output folder of one run, created only when the run starts training or evaluating.

    ``unique``: a new folder named ``path`` (``path-2``, ``path-3``, ... when that exists already). With
    ``points_latest`` (a run that writes checkpoints, into a folder of output/) ``<parent>/latest`` is pointed at it (a symlink,
    replaced atomically; ``<parent>/LATEST``, a text file holding the name, where symlinks cannot be
    made). ``own``: the folder is already this run's (--resume):
    nothing in it is removed. ``overwrite``: the files of an earlier run are removed first. A run that
    fails before writing a checkpoint or results leaves the disk as it found it (:meth:`discard`).
    """

    def __init__(self, path: str, *, unique: bool = False, own: bool = False, overwrite: bool = False,
                 points_latest: bool = False):
        self.path, self.unique, self.own, self.overwrite = path, unique, own, overwrite
        self.points_latest = points_latest
        self.created: List[str] = []  # folders made by this run, innermost first
        self.opened = False
        self.latest: Optional[Tuple[str, Optional[str]]] = None  # (pointer path, what it held before)

    def open(self) -> str:
        """Create the folder (and clear an earlier run's files with ``overwrite``); returns its path."""
        try:
            if self.unique:
                parent = os.path.dirname(self.path) or "."
                self.created = _missing_dirs(parent)
                os.makedirs(parent, exist_ok=True)
                base, n = self.path, 1
                while True:
                    try:
                        os.mkdir(self.path)
                        break
                    except FileExistsError:  # another run started in the same second
                        n += 1
                        self.path = f"{base}-{n}"
                self.created.insert(0, os.path.abspath(self.path))
            else:
                self.created = _missing_dirs(self.path)
                os.makedirs(self.path, exist_ok=True)
        except OSError as err:
            raise _cannot_write(self.path, err) from None
        self.opened = True
        if self.overwrite and not self.own:
            for name in OVERWRITTEN:
                if os.path.isfile(os.path.join(self.path, name)):
                    os.remove(os.path.join(self.path, name))
        if self.points_latest:
            self._point_latest()
        return self.path

    def _point_latest(self) -> None:
        parent, name = os.path.dirname(self.path) or ".", os.path.basename(self.path)
        link, tmp = os.path.join(parent, LATEST), os.path.join(parent, f".{LATEST}.{os.getpid()}")
        try:
            before = os.readlink(link) if os.path.islink(link) else None
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.symlink(name, tmp)
            os.replace(tmp, link)
            self.latest = (link, before)
            return
        except (OSError, NotImplementedError):
            if os.path.lexists(tmp):
                os.remove(tmp)
        text = os.path.join(parent, LATEST.upper())
        before = open(text).read() if os.path.isfile(text) else None
        write_text_atomic(name + "\n", text)
        self.latest = (text, before)

    def discard(self) -> None:
        """After a failure: unless the run wrote a checkpoint or results, remove its config.yaml and the
        folders it created, and point ``latest`` back where it was."""
        if not self.opened or self.own or any(os.path.exists(os.path.join(self.path, name)) for name in PRODUCTS):
            return
        config = os.path.join(self.path, "config.yaml")
        if os.path.isfile(config):
            os.remove(config)
        _remove_dirs(self.created[:1])
        if self.latest and not os.path.exists(self.path):
            pointer, before = self.latest
            try:
                if os.path.islink(pointer) or before is None:
                    os.remove(pointer)
                if before is not None and pointer.endswith("LATEST"):
                    write_text_atomic(before, pointer)
                elif before is not None:
                    os.symlink(before, pointer)
            except OSError:
                pass
        if not os.path.exists(self.path):
            _remove_dirs(self.created[1:])


def run_folder_name(args: Any, arch: str, when: float) -> str:
    """``20261125-134501_vit_pico_patch2_8_tk_n_k2``: start time, arch, method, tokens removed per block
    (``_eval``/``_bench`` for those modes)."""
    tokens = str(args.schedule) if isinstance(args.schedule, int) else "-".join(map(str, args.schedule))
    mode = "_eval" if args.eval_only else ("_bench" if args.benchmark else "")
    return re.sub(r"[^\w.+-]", "_", f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}_{arch}_"
                                     f"{args.method}_k{tokens}{mode}")


def _short(path: str) -> str:
    """``path`` relative to the working folder when it lies inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def plan_output_dir(args: Any, arch: str, processes: Processes, started: float) -> "RunFolder":
    """Where the run writes (the folder's ``path``), checked before any data is read (nothing is created
    yet): a new folder under OUTPUT_ROOT without --output_dir; --resume: the checkpoint's own folder (the
    real one, not output/latest); an explicit --output_dir must not hold another run's files (unless
    --overwrite). ``arch``: how the model is named in a new folder's name. Only a training run into a
    folder of output/ (its own, or ``--output_dir output/NAME``) moves ``output/latest``: evaluations and
    benchmarks write no checkpoints, and a resumed run keeps its place."""
    trains = not (args.eval_only or args.benchmark)
    if args.resume:
        own = os.path.realpath(os.path.dirname(os.path.abspath(args.resume)))
        path = args.output_dir or _short(own)
        same = os.path.realpath(path) == own
        folder = RunFolder(path, own=same, overwrite=args.overwrite)
        refuse = not same and not args.overwrite
    elif args.output_dir:  # latest names it too when it is a folder of output/ (--output_dir output/NAME)
        path = args.output_dir
        in_output = os.path.dirname(os.path.abspath(path)) == os.path.abspath(OUTPUT_ROOT)
        folder = RunFolder(path, overwrite=args.overwrite, points_latest=trains and in_output)
        refuse = not args.overwrite
    else:
        name = distributed.gather(run_folder_name(args, arch, started), processes)[0]  # rank 0's clock
        path = os.path.join(OUTPUT_ROOT, name)
        folder, refuse = RunFolder(path, unique=True, points_latest=trains), False

    def check() -> None:
        check_output_dir(OUTPUT_ROOT if folder.unique else path)
        if refuse:
            refuse_another_run(path)
    distributed.on_main(check, processes)
    return folder
