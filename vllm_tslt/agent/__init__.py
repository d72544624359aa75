"""Device side: the draft agent. Installs and imports without vLLM (extra `device`)."""
