"""The mechanism study: why gradient methods leave the poison in (hypotheses H1 and H2), with its figures."""
