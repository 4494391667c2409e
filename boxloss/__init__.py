"""boxloss."""
