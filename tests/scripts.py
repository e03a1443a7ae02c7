"""Run one of the project's scripts as a user does, in a child process: `python script.py ...`, or under
`torchrun` for more than one process. The tests that use it check what a user sees: the exit status, the
step lines, the one-line errors."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, nproc=1, threads=1, check=True, timeout=600, env=None):
    """Run `script` from the repo root with `args` (any value, turned into text); return the CompletedProcess.
    check=True raises with the end of the output if the script fails, so a test's failure shows why."""
    if nproc == 1:
        cmd = [sys.executable, script]
    else:  # torchrun's module form, so the test needs no `torchrun` on PATH
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    # each process gets `threads` threads: 2 DDP processes x 1 thread fit the 2-core CI machine
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    result = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
