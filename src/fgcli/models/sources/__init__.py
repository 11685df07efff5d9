"""Model sources: one resolver per form of ``--model``, all returning :class:`fgcli.models.base.Built`.

* :mod:`fgcli.models.sources.tvision` -- torchvision classifier names;
* :mod:`fgcli.models.sources.timm_source` -- ``timm/NAME``;
* :mod:`fgcli.models.sources.usercode` -- ``file.py:factory``, ``package.module:factory``, and
  whole pickled model files;
* :mod:`fgcli.models.sources.checkpoint` -- checkpoint files of every kind, unwrapped and fitted
  to an architecture in one place.

:func:`fgcli.models.load.load_model` picks the source from the spec's form.
"""
