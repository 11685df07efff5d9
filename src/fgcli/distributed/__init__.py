"""Running one dump as many processes: shards of an output tree, their merge,
torchrun ranks and Ray Data actors. Each process still runs :func:`fgcli.dump.run.run`
(Ray's driver with its own compute step) or its batch step (:func:`fgcli.dump.step.step`,
a Ray actor); this package only decides which images a process takes, how its records
reach the tree's manifest, and who merges."""
