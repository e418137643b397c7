"""What a step is: reasoning formats, the one step rule (offline :class:`Trace`, online
tracker), token alignment, the answer in a text, and which format a model speaks.

No model code here: everything works on text, token ids and a tokenizer.
"""

# the harmony format (gpt-oss) registers itself; importing it here makes it registered
# whenever any module of this package is imported
from stepsal_lens.segments import harmony as _harmony  # noqa: E402, F401
