"""``fullgrad eval``: how faithful are the maps? Metrics (:mod:`.metrics`), the methods
compared (:mod:`.methods`), the batched run over images (:mod:`.run`) and its report
(:mod:`.report`)."""
