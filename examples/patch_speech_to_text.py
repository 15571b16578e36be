"""Speech -> text activation patching: the mirror of ``patch_text_to_speech.py``.

For every word w, the residual stream of the *speech* run at w's units is written into the
*text* run at w's token(s) (``--rule last``: last unit -> last sub-token; ``mean``: mean over the
units -> every sub-token), one layer at a time; the metric is the log-prob of the next word's
text token at w's last sub-token. Does the text run still predict the next word when it is
given what the model made of the spoken word?

    python examples/patch_speech_to_text.py --out runs/patch_s2t          # tiny random SpiritLM
    python examples/patch_speech_to_text.py --checkpoint PATH --manifest data.jsonl --out DIR

Without ``--checkpoint`` the model is a tiny random SpiritLM-format checkpoint: runs in seconds,
curves meaningless (random weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from patch_text_to_speech import main  # same experiment, other direction

if __name__ == "__main__":
    main("speech-to-text", __doc__)
