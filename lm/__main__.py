from lm.cli import main

main()
