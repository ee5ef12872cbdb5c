"""The random control arm: a dynamic method's schedule and move sizes with random decisions (not a method to use)."""
