"""Imported once by the local executor's forkserver, so every worker process it forks starts with
spaCy imported, the English tokenizer built and the language-ID model loaded (importing spaCy alone
takes seconds, which each of a run's many short tasks would otherwise pay again)."""
from datapipe.lid import load_identifier
from datapipe.tokens import warm

warm("en")
load_identifier()
