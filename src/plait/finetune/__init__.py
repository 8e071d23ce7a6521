"""Fine-tuning tasks on plait's parallel models: token classification (named-entity recognition)
from CoNLL files, scored per entity with seqeval (``ner.py``; the data in ``conll.py``)."""
