"""Data poisoning: the attacks, the crafting they need, and the poisoned train set they return."""
