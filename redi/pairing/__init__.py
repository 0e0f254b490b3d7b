"""Teacher traces to SFT rows and preference pairs, by the authors' rules (`redi data pair`)."""
