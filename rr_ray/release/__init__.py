"""Release stage (paper section 3.2): PEM algebra, threshold rules, training and the equation-1 loop."""
