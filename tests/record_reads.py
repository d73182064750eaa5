"""``python -m jvit.main`` that also records which examples this process reads (test_multihost).

Run as ``python tests/record_reads.py <jvit.main flags>`` with ``JVIT_READS_DIR`` set: every split
opened by the trainer is wrapped so that each ``data[i]`` appends ``i`` to a list, written at exit to
``$JVIT_READS_DIR/<split>.<process index>.json``. With ``input.num_threads=0`` and
``input.prefetch_batches=0`` grain reads synchronously, so the k-th train read of host h is stream
position ``h + k * hosts``. The trainer itself is unchanged.
"""

import atexit
import dataclasses
import json
import os

from absl import app

from jvit import main
from jvit.data import sources


class _Reads:
    """Random-access view of ``data`` that logs the indices read."""

    def __init__(self, data, log):
        self._data, self._log = data, log

    def __len__(self):
        return len(self._data)

    def __getitem__(self, index):
        self._log.append(int(index))
        return self._data[index]

    def __getattr__(self, name):
        return getattr(self._data, name)


_open_split = sources.open_split
_reads: dict[str, list[int]] = {}


def _recording_open_split(input_config, spec, **kwargs):
    split = _open_split(input_config, spec, **kwargs)
    return dataclasses.replace(split, data=_Reads(split.data, _reads.setdefault(spec, [])))


@atexit.register
def _write():
    import jax

    for spec, log in _reads.items():
        with open(os.path.join(os.environ["JVIT_READS_DIR"], f"{spec}.{jax.process_index()}.json"), "w") as f:
            json.dump(log, f)


sources.open_split = _recording_open_split
app.run(main.main)
