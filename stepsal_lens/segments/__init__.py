"""What a step is: reasoning formats, the one step rule (offline :class:`Trace`, online
tracker), token alignment, the answer in a text, and which format a model speaks.

No model code here: everything works on text, token ids and a tokenizer.
"""
