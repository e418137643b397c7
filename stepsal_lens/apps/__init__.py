"""What users run and look at: the ``stepsal`` CLI, the demo and its report, figures and
the notebook explorers."""
