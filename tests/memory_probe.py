"""The kernel's own peak resident set size of this process (VmHWM), resettable.

`getrusage().ru_maxrss` survives exec: a process started from a large test runner reports the runner's peak,
which hides any growth after it. VmHWM belongs to the process's own memory and can be reset to the current
size (`/proc/self/clear_refs`), so a measurement sees only what the code under test adds.
"""

PEAK_SOURCE = '''
def reset_peak():
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
'''
"""The two functions as source, for code run with `python -c` in a fresh process."""

exec(PEAK_SOURCE)
