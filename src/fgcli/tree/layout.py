"""The output tree's layout: the names of its files and folders (one home for them).

Layout under ``--out``::

    heatmaps/<key>[.top<R>_<class>].png   colormapped map at the original resolution
    overlays/<key>[.top<R>_<class>].jpg   the image blended with the heatmap
    maps/<key>[.top<R>_<class>].npy       float32 map at model resolution (engine output)
    decomp/<key>[.top<R>_<class>].npz     compact decomposition (``--save decomp``)
    manifest.jsonl                        one JSON line per image (and per target)
    run.json                              what the last run (or merge) did
    shards/<I>-of-<N>/manifest.jsonl      a shard's lines until `fullgrad merge` takes them
    shards/<I>-of-<N>/run.json            what that shard did
    .fullgrad.lock                        held while a run is writing here
    .tmp/                                 scratch for atomic writes; emptied at every start

``<key>`` is the manifest's key (valid UTF-8, see :mod:`fgcli.names`); a path component
longer than the file system allows (255 bytes) is cut and ends in ``~`` and a hash.

Who writes what: :mod:`fgcli.tree.atomic` (whole files), :mod:`fgcli.tree.lock` (who may
write), :mod:`fgcli.tree.manifest` (the manifest's lines), :mod:`fgcli.tree.writer`
(:class:`~fgcli.tree.writer.OutputTree`, one tree's view composing them).
"""

from __future__ import annotations

MANIFEST = "manifest.jsonl"
RUN_JSON = "run.json"
LOCK = ".fullgrad.lock"
TMP = ".tmp"
SHARDS = "shards"
SUFFIX = {"heatmap": ".png", "overlay": ".jpg", "map": ".npy", "decomp": ".npz"}
FOLDER = {"heatmap": "heatmaps", "overlay": "overlays", "map": "maps", "decomp": "decomp"}
