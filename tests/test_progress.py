"""Progress bars in a log: one line per interval, no carriage returns."""

import time

from insclr.io import progress


def test_bar_in_a_log_prints_lines(capsys, monkeypatch):
    monkeypatch.setenv("INSCLR_PROGRESS_INTERVAL", "0.2")
    with progress(total=3000, desc="work", disable=False) as bar:
        for i in range(3000):
            bar.update(1)
            if i == 1500:
                time.sleep(0.25)  # one interval passes: one line in the middle
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    # the start, about the middle, the end (tqdm may print the final state twice: at the last
    # update and at close); thousands of updates give a handful of lines
    assert 2 <= len(lines) <= 5, lines
    assert lines[0].startswith("work:") and "3.00k/3.00k" in lines[-1]
