"""The runtime wing: what runs inside a patched model's forward.

``patch`` installs and removes the layer loop (``loop``) on a model instance; ``policy`` decides
which rows stop where; ``config`` says which layers are checked and how finished rows are handled;
``wallclock`` times the patched model against the unpatched one. Model-type facts come from
``adainfer.models``; nothing here imports the calibration or application wings.
"""
