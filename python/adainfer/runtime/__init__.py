"""The runtime wing: what runs inside a patched model's forward.

``patch`` installs and removes the layer loop (``loop``, with its row bookkeeping in ``rows``) on a
model instance; ``stats`` records what each pass did (``ExitStats``); ``decode`` turns rows' hidden
states into exit answers and ``answers`` delivers them in the logits; ``policy`` decides which rows
stop where; ``config`` says which layers are checked and how finished rows are handled;
``placement`` follows models spread over devices; ``wallclock`` times the patched model against
the unpatched one. Model-type facts come from ``adainfer.models``; nothing here imports the
calibration or application wings.
"""
