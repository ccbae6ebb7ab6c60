from tests.fakes.serve import main

main()
