"""privenc: learn privacy-preserving image encoders by adversarial training (Pittaluga et al.,
WACV 2019) and verify them against attackers retrained on the fixed encoder."""

__version__ = "0.1.0"
