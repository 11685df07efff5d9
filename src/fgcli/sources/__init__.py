"""Model sources: one resolver per form of ``--model``, all returning :class:`fgcli.models.Built`.

* :mod:`fgcli.sources.tvision` -- torchvision classifier names;
* :mod:`fgcli.sources.timm_source` -- ``timm/NAME``;
* :mod:`fgcli.sources.usercode` -- ``file.py:factory``, ``package.module:factory``, and
  whole pickled model files;
* :mod:`fgcli.sources.checkpoint` -- checkpoint files of every kind, unwrapped and fitted
  to an architecture in one place.

:func:`fgcli.models.load_model` picks the source from the spec's form.
"""
