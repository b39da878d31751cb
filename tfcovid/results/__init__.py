"""Results of a model on data: ``scores`` (scikit-learn reports for both tasks), ``plots``
(curves, confusion matrices, ROC) and ``tables`` (the study's results tables from run
directories).

May import: ``data`` (to predict a split for the plots), ``models``, ``config``, ``utils``;
never ``training``, ``inference`` or ``cli``.
"""
