from lm.cli.main import main

main()
